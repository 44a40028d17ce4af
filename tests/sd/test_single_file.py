"""Single-file SD 1.x / SD 2.x checkpoints (original LDM layout) load to the same models as diffusers folders."""
from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_harmonize.pipelines.sd import single_file
from comfyui_harmonize.pipelines.core.errors import WeightsError
from comfyui_harmonize.pipelines.sd.loading import load_diffusers_folder
from comfyui_harmonize.pipelines.sd.models import load_sd
from comfyui_harmonize.pipelines.sd.single_file import detect_family, load_single_file, sidecar_config_dir

import tiny_models as tm

CASES = [("sd1", 9), ("sd2", 4)]  # the other two combinations: test_detect_family, test_tokenizer_*


def _sd2_models(in_channels: int, vocab_size: int, seed: int = 10):
    """SD 2.x-style tiny models: linear attention projections in the UNet, GELU text encoder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**tm.unet_config(in_channels), "use_linear_projection": True}).eval()
    cfg = tm.tiny_text_encoder(vocab_size).config.to_dict()
    cfg["hidden_act"] = "gelu"
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(cfg)).eval()
    return unet, text_encoder


def _pad_with_bang(tokenizer_folder: Path) -> None:
    """What the official SD 2 tokenizer config says: pad_token "!"."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = json.loads((tokenizer_folder / name).read_text())
        data["pad_token"] = "!"
        (tokenizer_folder / name).write_text(json.dumps(data))


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{c}ch" for f, c in CASES])
def pair(request, tmp_path_factory):
    """(diffusers-folder components, path of the same weights as one LDM-layout file, family, in_channels)."""
    family, in_channels = request.param
    root = tmp_path_factory.mktemp(f"{family}_{in_channels}")
    folder = tm.save_diffusers_pipeline(root / "pipe", in_channels=in_channels, seed=in_channels)
    if family == "sd2":
        unet, text_encoder = _sd2_models(in_channels, len(tm.tiny_tokenizer(root / "tok")))
        unet.save_pretrained(folder / "unet")
        text_encoder.save_pretrained(folder / "text_encoder")
        _pad_with_bang(folder / "tokenizer")
    ref = load_diffusers_folder(folder)
    path = tm.save_single_file(root / "model.safetensors", ref.unet, ref.vae, ref.text_encoder, family)
    return ref, path, family, in_channels


def _outputs(sd, in_channels: int):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, in_channels, 8, 8, generator=g)
    latents = torch.randn(1, 4, 4, 4, generator=g)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    ids = sd.tokenizer("a photo of a cat", padding="max_length", max_length=sd.tokenizer.model_max_length,
                       truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = sd.text_encoder(ids).last_hidden_state
        noise = sd.unet(sample, 10, encoder_hidden_states=hidden).sample
        decoded = sd.vae.decode(latents).sample
        moments = sd.vae.encode(image).latent_dist.mean
    return {"ids": ids, "hidden": hidden, "unet": noise, "decoded": decoded, "encoded": moments}


def test_single_file_equals_diffusers_folder(pair):
    ref, path, family, in_channels = pair
    got = load_single_file(path)
    assert got.unet.config.in_channels == in_channels
    assert got.source == str(path) and got.dtype == torch.float32
    for name, module in ref.modules().items():
        a, b = module.state_dict(), got.modules()[name].state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert not any(p.requires_grad or p.is_meta for p in got.modules()[name].parameters())
    out_ref, out_got = _outputs(ref, in_channels), _outputs(got, in_channels)
    for key in out_ref:
        assert torch.equal(out_ref[key], out_got[key]), key
    assert got.scheduler_config == ref.scheduler_config
    pad = got.tokenizer.pad_token_id
    assert pad == (0 if family == "sd2" else got.tokenizer.eos_token_id)
    assert out_got["ids"][0, -1].item() == pad


def test_file_is_in_the_original_layout(pair):
    _, path, family, in_channels = pair
    state = load_file(str(path))
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "alphas_cumprod")
    assert all(k.startswith(prefixes) for k in state)
    assert state["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == in_channels
    assert "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight" in state
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in state  # upsampler after a plain up block
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert "first_stage_model.decoder.up.0.block.1.conv1.weight" in state
    if family == "sd1":
        assert "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight" in state
    else:
        w = state["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
        assert w.shape == (3 * tm.CROSS_DIM, tm.CROSS_DIM)
        assert "cond_stage_model.model.transformer.resblocks.2.mlp.c_proj.bias" in state  # unused last block
    assert detect_family(state, str(path)) == (family, in_channels)


def test_load_sd_dispatches_files_and_reads_ckpt(pair, tmp_path):
    ref, path, family, in_channels = pair
    via_load_sd = load_sd(path)
    ckpt = tm.save_single_file(tmp_path / "model.ckpt", ref.unet, ref.vae, ref.text_encoder, family)
    via_ckpt = load_single_file(ckpt)
    for got in (via_load_sd, via_ckpt):
        a, b = ref.unet.state_dict(), got.unet.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        a, b = ref.text_encoder.state_dict(), got.text_encoder.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_explicit_config_dir_and_missing_sidecar(pair, tmp_path):
    ref, path, family, _ = pair
    lone = tmp_path / "renamed.safetensors"
    shutil.copyfile(path, lone)
    configs = shutil.copytree(sidecar_config_dir(path), tmp_path / "elsewhere")
    got = load_single_file(lone, config_dir=configs)
    assert torch.equal(got.vae.decoder.conv_out.weight, ref.vae.decoder.conv_out.weight)
    with pytest.raises(WeightsError, match="config folder not found"):
        load_single_file(lone, config_dir=tmp_path / "nope")
    # without its sidecar the tiny file meets the full-size shipped configs: a clear mismatch, with the fix
    with pytest.raises(WeightsError, match=r"shape mismatches.*renamed\.config"):
        load_single_file(lone, tokenizer_dir=configs / "tokenizer")


@pytest.fixture(scope="module")
def sd1_tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sd1")
    tok = tm.write_tiny_tokenizer(root / "tok")
    models = tm.tiny_unet(4), tm.tiny_vae(), tm.tiny_text_encoder(len(tm.tiny_tokenizer(tok)))
    return root, tok, models


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_tokenizer_from_tokenizer_dir_pads_like_the_official_config(sd1_tiny, family, tmp_path):
    from transformers import CLIPTokenizer

    _, tok_dir, (unet, vae, te) = sd1_tiny
    path = tm.save_single_file(tmp_path / "m.safetensors", unet, vae, te, family, tokenizer=False)
    with pytest.raises(WeightsError, match="no CLIP tokenizer found"):
        load_single_file(path)
    got = load_single_file(path, tokenizer_dir=tok_dir).tokenizer
    # official tokenizer configs: SD 2 (stabilityai) pads with "!", SD 1.5 (runwayml) with <|endoftext|>
    pad = "!" if family == "sd2" else "<|endoftext|>"
    official = CLIPTokenizer.from_pretrained(str(tok_dir), pad_token=pad, model_max_length=77)
    for text in ("", "a photo of a golden cat"):
        a = got(text, padding="max_length", truncation=True).input_ids
        b = official(text, padding="max_length", truncation=True).input_ids
        assert a == b and len(a) == 77
    assert got.pad_token == pad
    assert got.pad_token_id == (0 if family == "sd2" else got.eos_token_id)


@pytest.mark.skipif(not (tm.SHARED / "data" / "clip_tokenizer" / "vocab.json").is_file(),
                    reason="../shared/data/clip_tokenizer (the real CLIP BPE files) is absent")
def test_real_clip_tokenizer_sd2_pads_with_id_0(sd1_tiny, tmp_path):
    _, _, (unet, vae, te) = sd1_tiny
    path = tm.save_single_file(tmp_path / "m.safetensors", unet, vae, te, "sd2", tokenizer=False)
    tok = load_single_file(path, tokenizer_dir=tm.SHARED / "data" / "clip_tokenizer").tokenizer
    ids = tok("a cat", padding="max_length", truncation=True).input_ids
    assert ids[:4] == [49406, 320, 2368, 49407] and ids[4:] == [0] * 73


def test_no_network_is_touched(sd1_tiny, tmp_path, monkeypatch):
    _, tok_dir, (unet, vae, te) = sd1_tiny
    path = tm.save_single_file(tmp_path / "m.safetensors", unet, vae, te, "sd1")

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    got = load_single_file(path)
    assert torch.equal(got.unet.conv_out.weight, unet.conv_out.weight)
    with pytest.raises(AssertionError, match="network"):
        socket.create_connection(("127.0.0.1", 9))


def test_prediction_type_and_dtype(sd1_tiny, tmp_path):
    _, _, (unet, vae, te) = sd1_tiny
    path = tm.save_single_file(tmp_path / "m.safetensors", unet, vae, te, "sd1")
    got = load_single_file(path, dtype=torch.bfloat16, prediction_type="v_prediction")
    assert got.scheduler_config["prediction_type"] == "v_prediction"
    assert got.dtype == torch.bfloat16
    assert {p.dtype for m in got.modules().values() for p in m.parameters()} == {torch.bfloat16}
    assert torch.equal(got.unet.conv_in.weight, unet.conv_in.weight.to(torch.bfloat16))
    assert load_single_file(path).scheduler_config["prediction_type"] == "epsilon"
    with pytest.raises(WeightsError, match="prediction_type"):
        load_single_file(path, prediction_type="flow")


def test_not_an_sd_checkpoint(sd1_tiny, tmp_path):
    root, _, (unet, vae, te) = sd1_tiny
    diffusers_unet = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(diffusers_unet))
    with pytest.raises(WeightsError, match=r"not a Stable Diffusion checkpoint.*down_blocks\.\* \(\d+\).*diffusers"):
        load_single_file(diffusers_unet)
    other = tmp_path / "other.safetensors"
    save_file({"backbone.layer1.weight": torch.zeros(2), "head.fc.bias": torch.zeros(1)}, str(other))
    with pytest.raises(WeightsError, match=r"found key families backbone\.\* \(1\), head\.\* \(1\)"):
        load_sd(other)


def _fake(keys: dict[str, tuple]) -> dict:
    return {k: torch.zeros(shape) for k, shape in keys.items()}


CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.mark.parametrize("keys, message", [
    ({CONV_IN: (8, 4, 3, 3), "conditioner.embedders.0.transformer.x": (1,)}, "SDXL"),
    ({CONV_IN: (8, 4, 3, 3), "first_stage_model.a": (1,)}, "unknown Stable Diffusion family.*neither"),
    ({CONV_IN: (8, 4, 3, 3), "first_stage_model.a": (1,), "cond_stage_model.transformer.a": (1,),
      "cond_stage_model.model.a": (1,)}, "unknown Stable Diffusion family.*both"),
    ({CONV_IN: (8, 9, 3, 3), "cond_stage_model.model.a": (1,)}, "no VAE"),
    ({CONV_IN: (8, 4), "first_stage_model.a": (1,), "cond_stage_model.model.a": (1,)}, "4-d conv"),
    ({"model.diffusion_model.out.0.weight": (1,)}, "not a Stable Diffusion checkpoint"),
    ({"lora_unet_down_blocks_0.alpha": (1,)}, "LoRA"),
])
def test_detect_family_errors(keys, message):
    with pytest.raises(WeightsError, match=message):
        detect_family(_fake(keys), "x.safetensors")


@pytest.mark.parametrize("family, channels", [("sd1", 4), ("sd1", 9), ("sd2", 4), ("sd2", 9)])
def test_detect_family(family, channels):
    text = "cond_stage_model.transformer.text_model.x" if family == "sd1" else "cond_stage_model.model.x"
    state = _fake({CONV_IN: (8, channels, 3, 3), "first_stage_model.a": (1,), text: (1,)})
    assert detect_family(state) == (family, channels)


def test_corrupt_and_unsafe_files(sd1_tiny, tmp_path):
    _, _, (unet, vae, te) = sd1_tiny
    path = tm.save_single_file(tmp_path / "m.safetensors", unet, vae, te, "sd1")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"truncated\.safetensors.*corrupt"):
        load_single_file(truncated)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(WeightsError, match=r"garbage\.ckpt"):
        load_single_file(garbage)
    pickled = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callback": Path("x")}, pickled)
    with pytest.raises(WeightsError, match="refused"):
        load_single_file(pickled)
    wrong = tmp_path / "model.onnx"
    wrong.write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"expected one of \.safetensors"):
        load_single_file(wrong)
    with pytest.raises(WeightsError, match="not found"):
        load_single_file(tmp_path / "missing.safetensors")


# Published parameter counts: SD 1.5 UNet / inpainting UNet, the SD VAE, CLIP ViT-L/14 text model,
# SD 2-base UNet, OpenCLIP ViT-H/14 text model as SD 2 uses it (23 of 24 layers).
PUBLISHED = {
    ("sd15", "unet", 4): 859_520_964, ("sd15", "unet", 9): 859_535_364,
    ("sd2", "unet", 4): 865_910_724, ("sd2", "unet", 9): 865_925_124,
    ("sd15", "vae", None): 83_653_863, ("sd2", "vae", None): 83_653_863,
    ("sd15", "text_encoder", None): 123_060_480, ("sd2", "text_encoder", None): 340_387_840,
}


@pytest.mark.parametrize("folder, part, channels", list(PUBLISHED), ids=[f"{a}-{b}-{c}" for a, b, c in PUBLISHED])
def test_shipped_configs_have_published_sizes(folder, part, channels):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = json.loads((single_file.CONFIGS / folder / f"{part}.json").read_text())
    with init_empty_weights():
        if part == "unet":
            model = UNet2DConditionModel.from_config({**cfg, "in_channels": channels})
        elif part == "vae":
            model = AutoencoderKL.from_config(cfg)
        else:
            model = CLIPTextModel(CLIPTextConfig.from_dict(cfg))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[(folder, part, channels)]


@pytest.mark.parametrize("folder", ["sd15", "sd2"])
def test_shipped_scheduler_and_tokenizer_configs(folder):
    from diffusers import DDIMScheduler, PNDMScheduler

    sched = json.loads((single_file.CONFIGS / folder / "scheduler.json").read_text())
    assert PNDMScheduler.from_config(sched).config.prediction_type == "epsilon"
    ddim = DDIMScheduler.from_config(sched)
    assert ddim.config.beta_schedule == "scaled_linear" and ddim.config.steps_offset == 1
    tok = json.loads((single_file.CONFIGS / folder / "tokenizer_config.json").read_text())
    assert tok["model_max_length"] == 77
    assert tok["pad_token"] == ("!" if folder == "sd2" else "<|endoftext|>")
