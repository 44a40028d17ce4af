"""DiffHarmony's condition VAE: loading the archive's condition_vae/, decode against a plain reference written
from the facts of the authors' code, the zero-skip property, errors, and its place in the pipeline."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import tiny_models
from comfyui_harmonize.pipelines.core.errors import WeightsError
from comfyui_harmonize.pipelines.diffharmony import condition_vae as cv
from comfyui_harmonize.pipelines.diffharmony import pipeline as dh
from conftest import make_composite


@pytest.fixture(scope="module")
def archive(models_root):
    return models_root / "diffharmony" / "DiffHarmony"


@pytest.fixture(scope="module")
def cvae(archive):
    return cv.load_condition_vae(archive / "condition_vae")


def test_loads_from_the_folder_the_archive_root_and_beside_base(archive, cvae):
    state = tiny_models.condition_vae_state_dict()
    for path in (archive, archive / "base"):
        other = cv.load_condition_vae(path).state_dict()
        assert other.keys() == state.keys()
        assert all(torch.equal(other[k], state[k]) for k in state)
    assert set(cvae.state_dict()) == set(state)
    assert cvae.config.additional_in_channels == 1 and cvae.scale_factor == 8


def _gaussian(moments):
    mean, logvar = torch.chunk(moments, 2, dim=1)
    return mean, torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))


def reference_decode(layers, state: dict, z: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """decode_with_cond as the authors' code computes it, written plainly: ``layers`` lends the diffusers
    encoder/decoder layers (resnets, downsamplers, mid blocks, norms), every convolution the authors add is
    applied with F.conv2d from the state dict, and the skip states are gathered and added by hand. (The layers
    are lent rather than rebuilt because oneDNN's convolution result depends, in the last bits, on where the
    weights live; the wiring is what this reference checks.)"""
    enc, dec = layers.conditional_encoder, layers.decoder
    pre = "conditional_encoder."
    for k, v in layers.state_dict().items():  # the lent layers hold the file's weights
        assert torch.equal(v, state[k])

    def conv(x, name, padding=0):
        return F.conv2d(x, state[f"{name}.weight"], state[f"{name}.bias"], padding=padding)

    with torch.no_grad():
        h = conv(cond[:, 3:], pre + "add_conv_in", padding=1) + enc.conv_in(cond[:, :3])
        states = [h]
        for block in enc.down_blocks:
            for resnet in block.resnets:
                h = resnet(h, None)
                states.append(h)
            if block.downsamplers is not None:
                h = block.downsamplers[0](h)
                states.append(h)
        h = enc.mid_block(h)
        mid = conv(h, pre + "mid_block_skip_conv")
        skips = [conv(s, f"{pre}down_block_skip_convs.{i}") for i, s in enumerate(states)]
        moments = conv(enc.conv_out(enc.conv_act(enc.conv_norm_out(h))), "quant_conv")
        mean, std = _gaussian(moments)
        z_cond = mean + std * noise
        x = conv(z, "post_quant_conv") + conv(conv(z_cond, "post_quant_conv"), "latent_skip_conv")
        x = dec.mid_block(dec.conv_in(x), None) + mid
        for block in dec.up_blocks:  # each resnet adds the deepest skip left
            for resnet in block.resnets:
                x = resnet(x, None) + skips.pop()
            if block.upsamplers is not None:
                x = block.upsamplers[0](x)
        assert not skips
        return dec.conv_out(dec.conv_act(dec.conv_norm_out(x)))


def test_decode_equals_the_plain_reference_bit_for_bit(cvae):
    image, mask = make_composite(40, 56, batch=2, seed=5)
    z = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(1))
    got = cv.decode(cvae, z, image, mask, generator=torch.Generator().manual_seed(9))
    x = image.permute(0, 3, 1, 2) * 2 - 1
    cond = torch.cat([x, (mask >= 0.5).float()[:, None]], 1)
    noise = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(9))
    want = reference_decode(cvae, tiny_models.condition_vae_state_dict(), z, cond, noise)
    assert torch.equal(got, ((want / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1))
    # and the skips matter: the plain decode of the same latent differs
    plain = ((cvae.decode(z) / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1)
    assert (got - plain).abs().max() > 1e-3


def test_with_zero_skips_it_decodes_like_its_own_plain_decoder(tmp_path):
    cvae = cv.load_condition_vae(tiny_models.write_condition_vae(tmp_path / "condition_vae", zero_skips=True))
    image, mask = make_composite(32, 48, seed=2)
    z = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        skip = cvae.decode_with_cond(z, cv.condition(image, mask, (32, 48)), torch.Generator().manual_seed(4))
        assert torch.equal(skip, cvae.decode(z))
        vae = tiny_models.tiny_vae(1)  # the encoder/decoder the fixture copied; diffusers' own decode
        built = cv.ConditionVAE.from_vae(vae)  # the authors' starting point: every skip conv at zero
        assert torch.equal(built.decode_with_cond(z, cv.condition(image, mask, (32, 48))), vae.decode(z).sample)


def test_tiled_with_zero_skips_equals_diffusers_tiled_vae():
    """Tiling follows diffusers' AutoencoderKL tiling: with every skip at zero, the condition VAE's tiled
    decode equals diffusers' tiled decode of the VAE it was built from, bit for bit, and its tiled encode
    diffusers' tiled encode."""
    vae = tiny_models.tiny_vae(1)  # sample_size 64: tiles of 64 px / 8 latent cells, several per image here
    built = cv.ConditionVAE.from_vae(vae)
    image, mask = make_composite(152, 104, seed=6)
    z = torch.randn(1, 4, 19, 13, generator=torch.Generator().manual_seed(2))
    x = image.permute(0, 3, 1, 2) * 2 - 1
    with torch.no_grad():
        vae.enable_tiling()
        built.enable_tiling()
        want = vae.decode(z).sample
        got = cv.decode_signed(built, z, cv.condition(image, mask, (152, 104)), torch.Generator().manual_seed(4))
        assert torch.equal(got, want)
        # encode: the same to float noise (untiled the two encoders already differ by ~1e-6: the attention
        # of a bare diffusers Encoder and of one inside AutoencoderKL run different kernels)
        assert torch.allclose(built.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean, atol=1e-5)
        vae.disable_tiling()
        assert (vae.encode(x).latent_dist.mean - built.encode(x).latent_dist.mean).abs().max() > 1e-3
        vae.enable_tiling()
        vae.disable_tiling()
        assert (vae.decode(z).sample - want).abs().max() > 1e-4  # the tiles do change the result


def test_tiled_decode_with_skips_cuts_condition_and_draw_with_the_latent(cvae):
    """With live skips: a latent that fits one tile decodes as untiled, bit for bit; a larger one is decoded
    tile by tile, each with the condition under it and its part of the one full-size posterior draw (so the
    first tile's corner, which no blend touches, is the untiled decode of that tile alone)."""
    image, mask = make_composite(120, 88, seed=7)
    cond = cv.condition(image, mask, (120, 88))
    z = torch.randn(1, 4, 15, 11, generator=torch.Generator().manual_seed(3))
    small = z[:, :, :8, :8]
    try:
        cvae.enable_tiling()
        one = cv.decode_signed(cvae, small, cond[:, :, :64, :64], torch.Generator().manual_seed(5))
        whole = cv.decode_signed(cvae, z, cond, torch.Generator().manual_seed(5))
    finally:
        cvae.disable_tiling()
    assert torch.equal(one, cv.decode_signed(cvae, small, cond[:, :, :64, :64], torch.Generator().manual_seed(5)))
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        posterior, skips, mid = cvae.encode_cond(cond[:, :, :64, :64])
        z_cond = posterior.mean + posterior.std * noise[:, :, :8, :8]
        h = cvae.post_quant_conv(small) + cvae.latent_skip_conv(cvae.post_quant_conv(z_cond))
        first = cvae.decode_skips(h, skips, mid)
    assert torch.equal(whole[:, :, :48, :48], first[:, :, :48, :48])
    assert whole.shape == (1, 3, 120, 88) and torch.isfinite(whole).all()
    assert (whole - cv.decode_signed(cvae, z, cond, torch.Generator().manual_seed(5))).abs().max() > 1e-4


def test_pipeline_tiles_the_condition_vae_above_the_threshold(archive, cvae, monkeypatch):
    sd = dh.load_diffharmony(archive)
    image, mask = make_composite(48, 64, seed=3)
    calls = []
    real = cv.tiled
    monkeypatch.setattr(cv, "tiled", lambda *a, **k: calls.append(a[1:]) or real(*a, **k))
    out = dh.harmonize(sd, image, mask, seed=1, steps=1, resolution=128, condition_vae=cvae)
    assert not calls  # 128 px: below the threshold, untiled
    monkeypatch.setattr(dh, "VAE_TILING_ABOVE", 64)
    tiled_out = dh.harmonize(sd, image, mask, seed=1, steps=1, resolution=128, condition_vae=cvae)
    assert calls and cvae.use_tiling is False  # encode and decode tiled; the model's setting restored
    assert tiled_out.shape == out.shape and (tiled_out - out).abs().max() > 0


def test_mismatched_keys_are_listed(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "condition_vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_models.condition_vae_config()))
    state = tiny_models.condition_vae_state_dict()
    state["conditional_encoder.extra_conv.weight"] = state.pop("conditional_encoder.add_conv_in.weight")
    del state["latent_skip_conv.bias"]
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError) as err:
        cv.load_condition_vae(folder)
    msg = str(err.value)
    assert "2 missing keys" in msg and "conditional_encoder.add_conv_in.weight" in msg and "latent_skip_conv.bias" in msg
    assert "1 unexpected keys: conditional_encoder.extra_conv.weight" in msg
    assert "diffusion_pytorch_model.safetensors" in msg


def test_missing_folder_names_where_it_looked(tmp_path, models_root):
    base = models_root / "diffusers" / "tiny-inpaint"
    with pytest.raises(WeightsError) as err:
        cv.load_condition_vae(base)
    assert str(base / "condition_vae") in str(err.value)
    (tmp_path / "base").mkdir()
    with pytest.raises(WeightsError) as err:
        cv.load_condition_vae(tmp_path / "base")
    assert str(tmp_path / "condition_vae") in str(err.value) and str(tmp_path / "base" / "condition_vae") in str(err.value)


def test_random_streams_are_independent_and_fixed_by_the_seed():
    seeds = {s: dh.stream_seed(5, s) for s in dh.STREAMS}
    assert seeds["noise"] == 5 and len(set(seeds.values())) == 3
    assert dh.stream_seed(5, "encode") == dh.stream_seed(5, "encode") != dh.stream_seed(6, "encode")
    with pytest.raises(ValueError):
        dh.stream_seed(5, "other")


def test_encode_draw_and_start_noise_do_not_coincide(archive):
    """The VAE-posterior draw of the composite and the sampler's start noise are different tensors for the
    same seed (they were the same tensor when both stages seeded a generator with the seed itself)."""
    sd = dh.load_diffharmony(archive)
    image, _ = make_composite(64, 64, seed=1)
    x = image.permute(0, 3, 1, 2) * 2 - 1
    with torch.no_grad():
        dist = sd.vae.encode(x).latent_dist
    latents = dh.encode(sd, image, 64, seed=3)
    encode_noise = (latents - dist.mean) / dist.std
    start_noise = torch.randn(latents.shape, generator=dh.generator(3, "noise"))
    assert torch.allclose(encode_noise, torch.randn(latents.shape, generator=dh.generator(3, "encode")), atol=1e-4)
    assert (encode_noise - start_noise).abs().max() > 0.5
    assert abs(float(torch.corrcoef(torch.stack([encode_noise.flatten(), start_noise.flatten()]))[0, 1])) < 0.5


def run_stage_nodes(sd, cvae, image, mask, seed, steps, res):
    from comfyui_harmonize.nodes import diffharmony as N

    (lat,) = N.HarmonizeDiffHarmonyEncode().encode(sd, image, res, "keep aspect", seed, condition_vae=cvae)
    (lmask,) = N.HarmonizeMaskToLatent().downsample(mask, lat)
    (out,) = N.HarmonizeDiffHarmonySampler().sample(sd, lat, lmask, seed, steps, "euler_ancestral", 1.0)
    (dec,) = N.HarmonizeConditionVAEDecode().decode(cvae, out, image, mask, seed)
    from comfyui_harmonize.nodes import color as CN

    return CN.HarmonizeRestore().restore(dec, image, mask, 0, "resample")[0]


def test_stage_nodes_equal_all_in_one_with_the_condition_vae_found_beside_base(archive, cvae, models_env):
    from comfyui_harmonize.nodes import diffharmony as N

    sd = dh.load_diffharmony(archive)
    image, mask = make_composite(72, 96, seed=6)
    chain = run_stage_nodes(sd, cvae, image, mask, seed=4, steps=2, res=64)
    args = (sd, image, mask, 4, 2, "euler_ancestral", 1.0, 64, "keep aspect", 32, 0, "resample")
    (found,) = N.HarmonizeDiffHarmony().harmonize(*args, decoder="condition vae")  # condition_vae/ beside base/
    (given,) = N.HarmonizeDiffHarmony().harmonize(*args, decoder="condition vae", condition_vae=cvae)
    (plain,) = N.HarmonizeDiffHarmony().harmonize(*args, decoder="vae")
    assert torch.equal(chain, found) and torch.equal(chain, given)
    inside = mask[..., None].expand_as(plain) > 0.5
    assert (chain - plain)[inside].abs().max() > 1e-3
    assert torch.equal(chain[~inside], image[~inside])
    # the loader node lists the archive's condition_vae/ and loads the same weights
    choices = N.HarmonizeConditionVAELoader.INPUT_TYPES()["required"]["condition_vae"][0]
    assert "diffharmony/DiffHarmony/condition_vae" in choices
    (loaded,) = N.HarmonizeConditionVAELoader().load("diffharmony/DiffHarmony/condition_vae", "fp32")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), cvae.state_dict().values()))


def test_decoder_condition_vae_without_the_folder_names_where_it_looked(models_root):
    from comfyui_harmonize.nodes import diffharmony as N

    sd = dh.load_diffharmony(models_root / "diffusers" / "tiny-inpaint")
    image, mask = make_composite(32, 32, seed=1)
    with pytest.raises(WeightsError) as err:
        N.HarmonizeDiffHarmony().harmonize(sd, image, mask, 0, 1, "euler_ancestral", 1.0, 64, "keep aspect", 32, 0,
                                           "resample", decoder="condition vae")
    assert str(models_root / "diffusers" / "tiny-inpaint" / "condition_vae") in str(err.value)
