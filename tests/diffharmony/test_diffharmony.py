"""DiffHarmony: loading, the stages against a plain reference loop, restore, errors, nodes."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F

from comfyui_harmonize.nodes import color as CN
from comfyui_harmonize.nodes import diffharmony as N
from comfyui_harmonize.pipelines.diffharmony import pipeline as dh
from comfyui_harmonize.pipelines.diffharmony import refiner as rf
from comfyui_harmonize.pipelines.core.errors import InputError, WeightsError
from comfyui_harmonize.pipelines.core.weights import load_state_dict
from conftest import make_composite

RES = 64  # working resolution for pipeline-level tests (tiny models)


@pytest.fixture(scope="module")
def archive(models_root):
    return models_root / "diffharmony" / "DiffHarmony"


@pytest.fixture(scope="module")
def sd(archive):
    return dh.load_diffharmony(archive)


@pytest.fixture(scope="module")
def refiner(archive):
    return rf.load_refiner(archive / "refinement")


def encode_stream_seed(seed: int) -> int:
    """The documented derivation of the encode draw's seed: SHA-256 of "<seed>/encode", first 8 bytes
    little-endian, top bit cleared (the start noise and sampler steps use the seed itself)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}/encode".encode()).digest()[:8], "little") & (2**63 - 1)


def reference_harmonize(sd, refiner, image, mask, seed, steps, res, refine_res):
    """DiffHarmony as reference/diffharmony.md describes it, written plainly with diffusers."""
    from diffusers import EulerAncestralDiscreteScheduler

    _, h, w, _ = image.shape
    scale = res / max(h, w)
    size = (max(8, round(h * scale / 8) * 8), max(8, round(w * scale / 8) * 8))
    x = F.interpolate(image.permute(0, 3, 1, 2), size=size, mode="bilinear", antialias=True).clamp(0, 1) * 2 - 1
    sf = sd.vae.config.scaling_factor
    with torch.no_grad():
        cond = sd.vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(encode_stream_seed(seed))) * sf
        m = F.interpolate((mask >= 0.5).float()[:, None], size=cond.shape[-2:], mode="nearest")
        ids = sd.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
        emb = sd.text_encoder(ids)[0]
        sched = EulerAncestralDiscreteScheduler.from_config(sd.scheduler_config)
        sched.set_timesteps(steps)
        gen = torch.Generator().manual_seed(seed)
        lat = torch.randn(cond.shape, generator=gen) * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = torch.cat([sched.scale_model_input(lat, t), m, cond], 1)
            lat = sched.step(sd.unet(inp, t, encoder_hidden_states=emb).sample, t, lat, generator=gen).prev_sample
        dec = sd.vae.decode(lat / sf).sample.clamp(-1, 1)
        harm01 = (dec / 2 + 0.5).clamp(0, 1)
        # refinement at refine_res (long side, multiple of 16), inputs in [-1, 1], mask in {0, 1}
        rs = (max(16, round(h * refine_res / max(h, w) / 16) * 16), max(16, round(w * refine_res / max(h, w) / 16) * 16))
        hr = F.interpolate(harm01, size=rs, mode="bilinear", antialias=True).clamp(0, 1) * 2 - 1
        cr = F.interpolate(image.permute(0, 3, 1, 2), size=rs, mode="bilinear", antialias=True).clamp(0, 1) * 2 - 1
        mr = (F.interpolate(mask[:, None], size=rs, mode="bilinear", antialias=True).clamp(0, 1) >= 0.5).float()
        out = refiner(torch.cat([hr, mr, cr], 1)).clamp(-1, 1)
        out01 = (out / 2 + 0.5).clamp(0, 1)
        up = F.interpolate(out01, size=(h, w), mode="bilinear", antialias=True).clamp(0, 1).permute(0, 2, 3, 1)
    m4 = mask[..., None]
    return torch.where(m4 > 0, up * m4 + image * (1 - m4), image)


def run_chain(sd, refiner, image, mask, seed, steps, res, refine_res):
    (lat,) = N.HarmonizeDiffHarmonyEncode().encode(sd, image, res, "keep aspect", seed)
    (lmask,) = N.HarmonizeMaskToLatent().downsample(mask, lat)
    (out,) = N.HarmonizeDiffHarmonySampler().sample(sd, lat, lmask, seed, steps, "euler_ancestral", 1.0)
    (dec,) = N.HarmonizeDiffHarmonyDecode().decode(sd, out)
    (ref,) = N.HarmonizeRefine().refine(refiner, dec, image, mask, refine_res, "keep aspect")
    (res_img,) = CN.HarmonizeRestore().restore(ref, image, mask, 0, "resample")
    return res_img


def test_node_chain_equals_plain_reference_loop(sd, refiner):
    image, mask = make_composite(389, 517, seed=3)
    got = run_chain(sd, refiner, image, mask, seed=7, steps=5, res=RES, refine_res=32)
    want = reference_harmonize(sd, refiner, image, mask, seed=7, steps=5, res=RES, refine_res=32)
    assert got.shape == image.shape
    assert torch.equal(got, want)


def test_all_in_one_equals_chain_and_is_deterministic(sd, refiner):
    image, mask = make_composite(96, 80, seed=1)
    chain = run_chain(sd, refiner, image, mask, seed=11, steps=3, res=RES, refine_res=32)
    (one,) = N.HarmonizeDiffHarmony().harmonize(sd, image, mask, 11, 3, "euler_ancestral", 1.0, RES, "keep aspect",
                                                32, 0, "resample", refiner=refiner)
    (again,) = N.HarmonizeDiffHarmony().harmonize(sd, image, mask, 11, 3, "euler_ancestral", 1.0, RES, "keep aspect",
                                                  32, 0, "resample", refiner=refiner)
    (other,) = N.HarmonizeDiffHarmony().harmonize(sd, image, mask, 12, 3, "euler_ancestral", 1.0, RES, "keep aspect",
                                                  32, 0, "resample", refiner=refiner)
    assert torch.equal(one, chain) and torch.equal(one, again)
    inside = mask[..., None].expand_as(one) > 0.5
    assert (one - other)[inside].abs().max() > 1e-3


def test_archive_diffusers_folder_and_single_file_give_same_output(archive, models_root, sd, tmp_path):
    import tiny_models

    folder = dh.load_diffharmony(models_root / "diffusers" / "tiny-inpaint")
    ckpt = tiny_models.save_single_file(tmp_path / "inpaint.safetensors", folder.unet, folder.vae,
                                        folder.text_encoder, "sd1")
    single = dh.load_diffharmony(ckpt)
    image, mask = make_composite(64, 64, seed=2)
    a = dh.harmonize(sd, image, mask, seed=4, steps=2, resolution=RES)
    b = dh.harmonize(folder, image, mask, seed=4, steps=2, resolution=RES)
    c = dh.harmonize(single, image, mask, seed=4, steps=2, resolution=RES)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, image)


@pytest.mark.parametrize("h,w", [(389, 517), (517, 389), (40, 1000), (1000, 33), (31, 29)])
def test_output_keeps_input_size_and_background_bytes(sd, h, w):
    image, mask = make_composite(h, w, seed=h)
    out = dh.harmonize(sd, image, mask, seed=0, steps=1, resolution=RES)
    assert out.shape == image.shape
    bg = mask[..., None].expand_as(image) == 0
    assert torch.equal(out[bg], image[bg])
    assert (out.numpy().view("uint32")[bg.numpy()] == image.numpy().view("uint32")[bg.numpy()]).all()
    fg = ~bg
    assert (out[fg] - image[fg]).abs().max() > 0  # the foreground was actually re-rendered


def test_batches_with_one_mask_or_one_mask_per_image(sd):
    image, mask = make_composite(64, 96, batch=2, seed=5)
    one_mask = dh.harmonize(sd, image, mask[:1], seed=1, steps=1, resolution=RES)
    per_image = dh.harmonize(sd, image, mask, seed=1, steps=1, resolution=RES)
    assert one_mask.shape == image.shape and torch.equal(one_mask, per_image)
    with pytest.raises(InputError, match="batch mismatch: 2 images but 3 masks"):
        dh.harmonize(sd, image, torch.cat([mask, mask[:1]]), seed=1, steps=1, resolution=RES)


def test_mask_of_other_aspect_ratio_is_refused_same_aspect_is_resized(sd):
    image, mask = make_composite(64, 96, seed=6)
    with pytest.raises(InputError, match="aspect ratios differ"):
        dh.harmonize(sd, image, torch.ones(1, 64, 64), steps=1, resolution=RES)
    small = F.interpolate(mask[:, None], size=(32, 48), mode="nearest")[:, 0]
    out = dh.harmonize(sd, image, small, steps=1, resolution=RES)
    assert out.shape == image.shape


def test_empty_mask_returns_composite_unchanged_with_warning(sd):
    image, _ = make_composite(48, 40)
    with pytest.warns(UserWarning, match="selects no pixel"):
        out = dh.harmonize(sd, image, torch.zeros(1, 64, 64), steps=1, resolution=RES)
    assert torch.equal(out, image)


def test_rgba_and_grey_inputs(sd):
    image, mask = make_composite(48, 64)
    rgba = torch.cat([image, torch.ones_like(image[..., :1])], -1)
    assert torch.equal(dh.harmonize(sd, rgba, mask, steps=1, resolution=RES),
                       dh.harmonize(sd, image, mask, steps=1, resolution=RES))
    grey = image[..., :1]
    out = dh.harmonize(sd, grey, mask, steps=1, resolution=RES)
    assert out.shape == (1, 48, 64, 3)
    with pytest.raises(InputError, match="channels"):
        dh.harmonize(sd, image[..., :2], mask, steps=1, resolution=RES)


def test_guidance_without_prompt_is_exactly_no_guidance_with_prompt_differs(sd):
    image, mask = make_composite(64, 64, seed=9)
    lat = dh.encode(sd, image, RES, seed=0)
    m = dh.latent_mask(mask, lat.shape[-2:])
    base = dh.sample(sd, lat, m, seed=3, steps=2)
    assert torch.equal(dh.sample(sd, lat, m, seed=3, steps=2, guidance=3.0), base)
    assert not torch.equal(dh.sample(sd, lat, m, seed=3, steps=2, guidance=3.0, prompt="winter"), base)


def test_every_scheduler_runs_and_empty_prompt_is_cached(sd):
    image, mask = make_composite(64, 64)
    lat = dh.encode(sd, image, RES, seed=0)
    m = dh.latent_mask(mask, lat.shape[-2:])
    outs = [dh.sample(sd, lat, m, steps=2, scheduler=s) for s in dh.SCHEDULERS]
    assert all(o.shape == lat.shape and torch.isfinite(o).all() for o in outs)
    assert sum(k[0] == "prompt" and k[1] == "" for k in sd.cache if isinstance(k, tuple)) == 1
    with pytest.raises(InputError, match="unknown scheduler"):
        dh.sample(sd, lat, m, steps=2, scheduler="heun9")


def test_latent_mask_is_binarised_nearest():
    mask = torch.tensor([[[0.2, 0.6], [0.5, 0.49]]]).repeat_interleave(4, 1).repeat_interleave(4, 2)
    out = dh.latent_mask(mask, (2, 2))
    assert torch.equal(out, torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]))


def test_square_fit_reproduces_official_resize(sd):
    image, _ = make_composite(48, 96)
    assert dh.encode(sd, image, RES, square=True).shape[-2:] == (8, 8)
    assert dh.encode(sd, image, RES).shape[-2:] == (4, 8)


def test_text_to_image_model_is_refused_with_in_channels(models_root):
    with pytest.raises(WeightsError, match="in_channels=4.*in_channels=9"):
        dh.load_diffharmony(models_root / "diffusers" / "tiny-txt2img")


def test_missing_folder_and_corrupt_files(tmp_path, models_root):
    with pytest.raises(WeightsError, match="not found"):
        dh.load_diffharmony(tmp_path / "nope")
    with pytest.raises(WeightsError, match="model_index.json"):
        dh.load_diffharmony(tmp_path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(WeightsError, match="corrupt"):
        load_state_dict(bad)
    ref = tmp_path / "refinement"
    ref.mkdir()
    (ref / "config.json").write_text("{}")
    (ref / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="corrupt"):
        rf.load_refiner(ref)


class _Payload:
    def __reduce__(self):  # would run code on unpickling
        return (print, ("pwned",))


def test_pickle_carrying_code_is_refused(tmp_path, models_root):
    evil = tmp_path / "evil.bin"
    torch.save({"weight": torch.zeros(1), "x": _Payload()}, evil)
    with pytest.raises(WeightsError, match="refused"):
        load_state_dict(evil)
    # the same inside a pipeline folder, through diffusers' loader
    import shutil

    pipe = tmp_path / "pipe"
    shutil.copytree(models_root / "diffharmony" / "DiffHarmony" / "base", pipe)
    with open(pipe / "unet" / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"x": _Payload()}, f)
    with pytest.raises(WeightsError, match="unet"):
        dh.load_diffharmony(pipe)


def test_refiner_wrong_in_channels_and_weight_mismatch(tmp_path):
    from tiny_models import write_refiner
    import json

    folder = write_refiner(tmp_path / "r", in_channels=7)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["in_channels"] = 5
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="in_channels must be 3, 4 or 7"):
        rf.load_refiner(folder)
    cfg["in_channels"] = 4
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="shape mismatch"):
        rf.load_refiner(folder)


def test_refiner_is_residual_on_harmonized_channels(refiner):
    x = torch.rand(1, 7, 32, 32) * 2 - 1
    with torch.no_grad():
        out = refiner(x)
        refiner_no_res = rf.RefinerUNet(**{**refiner.config, "input_residual": False})
        refiner_no_res.load_state_dict(refiner.state_dict())
        body = refiner_no_res(x)
    torch.testing.assert_close(out, body + x[:, :3])


def test_refine_resolution_must_be_multiple_of_16_and_square_fit(refiner):
    image, mask = make_composite(32, 48)
    with pytest.raises(InputError, match="multiple of 16"):
        rf.refine(refiner, image, image, mask, resolution=40)
    assert rf.refine(refiner, image, image, mask, resolution=32).shape == (1, 16, 32, 3)
    assert rf.refine(refiner, image, image, mask, resolution=32, square=True).shape == (1, 32, 32, 3)


def test_loader_nodes_list_and_load_models(models_env):
    names = N.HarmonizeDiffHarmonyLoader.INPUT_TYPES()["required"]["model"][0]
    assert "diffharmony/DiffHarmony" in names and "diffusers/tiny-inpaint" in names
    assert N.HarmonizeRefinerLoader.INPUT_TYPES()["required"]["refiner"][0] == ["diffharmony/DiffHarmony/refinement"]
    (model,) = N.HarmonizeDiffHarmonyLoader().load("diffharmony/DiffHarmony", "auto")
    assert model.unet.config.in_channels == 9 and model.unet.dtype == torch.float32
    (ref,) = N.HarmonizeRefinerLoader().load("diffharmony/DiffHarmony/refinement", "fp32")
    assert ref.config["in_channels"] == 7
    with pytest.raises(WeightsError, match=r"not found\. Searched: .*diffharmony"):
        N.HarmonizeDiffHarmonyLoader().load("diffharmony/missing", "auto")


def test_vae_tiles_only_above_the_threshold_and_is_restored(sd, monkeypatch):
    image, _ = make_composite(48, 64)
    calls = []
    real_encode, real_decode = sd.vae.encode, sd.vae.decode
    monkeypatch.setattr(sd.vae, "encode", lambda x: calls.append(("enc", sd.vae.use_tiling)) or real_encode(x))
    monkeypatch.setattr(sd.vae, "decode", lambda z: calls.append(("dec", sd.vae.use_tiling)) or real_decode(z))
    lat = dh.encode(sd, image, RES)
    dh.decode(sd, lat)
    monkeypatch.setattr(dh, "VAE_TILING_ABOVE", 32)
    tiled = dh.encode(sd, image, RES)
    out = dh.decode(sd, tiled)
    assert calls == [("enc", False), ("dec", False), ("enc", True), ("dec", True)]
    assert sd.vae.use_tiling is False and tiled.shape == lat.shape and out.shape == (1, 48, 64, 3)
