"""Native DiffHarmony without ComfyUI: the conditioning's tensors are the pack's own (same resize, same latent
mask), bad MODEL/VAE pairs are refused before any work, an empty mask warns, and the nodes that need ComfyUI's
objects say so. ComfyUI's own objects are exercised by test_native_host.py and tests/test_real_host.py."""
from __future__ import annotations

import json
import types
import warnings
from pathlib import Path

import pytest
import torch

import comfyui_harmonize
import workflow_runner as wr
from comfyui_harmonize.nodes import host
from comfyui_harmonize.nodes.diffharmony import (HarmonizeDiffHarmonyConditioning,
                                                 HarmonizeDiffHarmonyNativeLoader)
from comfyui_harmonize.pipelines.core import images
from comfyui_harmonize.pipelines.core.errors import InputError
from comfyui_harmonize.pipelines.diffharmony import native
from comfyui_harmonize.pipelines.diffharmony import pipeline as dh
from conftest import make_composite

ROOT = Path(comfyui_harmonize.__file__).parent
NATIVE = ROOT / "workflows" / "diffharmony_native.json"


# ------------------------------------------------------------------ stand-ins with ComfyUI's interfaces
class FakeVAE:
    """ComfyUI VAE interface: ``latent_channels`` and ``encode(IMAGE) -> latent`` (the mean)."""

    def __init__(self, vae, latent_channels=4):
        self.vae, self.latent_channels, self.calls = vae, latent_channels, 0

    def encode(self, pixels):
        self.calls += 1
        with torch.no_grad():
            return self.vae.encode(pixels.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode()


class FakeCLIP:
    def __init__(self):
        self.texts = []

    def tokenize(self, text):
        self.texts.append(text)
        return text

    def encode_from_tokens_scheduled(self, tokens):
        return [[torch.zeros(1, 77, 32), {"pooled_output": torch.zeros(1, 32)}]]


def fake_model(in_channels=9, latent_channels=4):
    """ComfyUI MODEL interface: ``model.model_config.unet_config`` and ``model.latent_format``."""
    base = types.SimpleNamespace(model_config=types.SimpleNamespace(unet_config={"in_channels": in_channels}),
                                 latent_format=types.SimpleNamespace(latent_channels=latent_channels))
    return types.SimpleNamespace(model=base)


@pytest.fixture(scope="module")
def tiny_vae():
    import tiny_models

    return tiny_models.tiny_vae()


# ------------------------------------------------------------------------------------------- checks
def test_text_to_image_unet_is_refused_with_what_is_needed():
    with pytest.raises(InputError) as err:
        native.check_fit(4, 4, 4)
    msg = str(err.value)
    assert "4 input channels" in msg and "text-to-image" in msg and "9" in msg and "inpainting" in msg


def test_vae_with_other_latent_channels_is_refused():
    with pytest.raises(InputError, match="16-channel latents but the MODEL works on 4"):
        native.check_fit(9, 4, 16)
    native.check_fit(9, 4, 4)  # DiffHarmony's pair passes


def test_node_refuses_a_bad_pair_before_encoding(tiny_vae):
    image, mask = make_composite(40, 56)
    vae = FakeVAE(tiny_vae, latent_channels=4)
    with pytest.raises(InputError, match="text-to-image"):
        HarmonizeDiffHarmonyConditioning().condition(fake_model(4), FakeCLIP(), vae, image, mask, 64, "keep aspect")
    with pytest.raises(InputError, match="16-channel"):
        HarmonizeDiffHarmonyConditioning().condition(fake_model(9), FakeCLIP(), FakeVAE(tiny_vae, 16), image, mask,
                                                     64, "keep aspect")
    assert vae.calls == 0


# ------------------------------------------------------------------------------------- the tensors
@pytest.mark.parametrize("square", [False, True])
def test_prepare_gives_the_pack_paths_pixels_and_latent_mask(square):
    image, mask = make_composite(61, 93)
    mask = mask * 0.7 + 0.2 * torch.rand_like(mask)  # soft values either side of 0.5
    before = image.clone(), mask.clone()
    pixels, m, empty = native.prepare(image, mask, 96, square)
    size = (96, 96) if square else (64, 96)
    assert tuple(pixels.shape) == (1, *size, 3)
    assert torch.equal(pixels, images.resize_images(image, size))  # what DiffHarmony Encode encodes
    assert torch.equal(m[:, 0], dh.latent_mask(mask, (size[0] // 8, size[1] // 8)))  # what Mask To Latent gives
    assert set(m.unique().tolist()) <= {0.0, 1.0} and not bool(empty.any())
    assert torch.equal(image, before[0]) and torch.equal(mask, before[1])


def test_conditioning_node_outputs(tiny_vae):
    image, mask = make_composite(61, 93, batch=2)
    clip, vae = FakeCLIP(), FakeVAE(tiny_vae)
    pos, neg, latent = HarmonizeDiffHarmonyConditioning().condition(fake_model(), clip, vae, image, mask, 96,
                                                                     "keep aspect")
    assert clip.texts == [""]  # DiffHarmony's empty prompt
    for cond in (pos, neg):
        values = cond[0][1]
        expect = vae.encode(images.resize_images(image, (64, 96)))
        assert torch.equal(values["concat_latent_image"], expect)  # the WHOLE composite, not greyed
        assert tuple(values["concat_mask"].shape) == (2, 1, 8, 12)
        assert torch.equal(values["concat_mask"][:, 0], dh.latent_mask(mask, (8, 12)))
        assert "pooled_output" in values
        assert "noise_mask" not in latent and "noise_mask" not in values  # the background is not locked
    assert tuple(latent["samples"].shape) == (2, 4, 8, 12) and not latent["samples"].any()


def test_empty_mask_warns(tiny_vae):
    image, mask = make_composite(40, 56)
    with pytest.warns(UserWarning, match="selects no pixel"):
        _, m, empty = native.prepare(image, torch.zeros_like(mask), 64)
    assert bool(empty.all()) and not m.any()


# ------------------------------------------------------------------------------- outside ComfyUI
def test_native_loader_needs_comfyui(models_env):
    with pytest.raises(host.NeedsComfyUI, match="needs ComfyUI"):
        HarmonizeDiffHarmonyNativeLoader().load("diffharmony/DiffHarmony", "default")


# --------------------------------------------------------------------------------------- workflow
def test_native_workflow_is_the_paper_on_comfyui_nodes():
    wf = json.loads(NATIVE.read_text())
    wr.validate(wf, {**comfyui_harmonize.NODE_CLASS_MAPPINGS}, check_files=False)
    assert wr.needs_comfyui(wf)
    by_type = {n["type"]: n for n in wf["nodes"]}
    seed, control, steps, cfg, sampler, scheduler, denoise = by_type["KSampler"]["widgets_values"]
    assert (steps, cfg, sampler, scheduler, denoise) == (5, 1.0, "euler_ancestral", "normal", 1.0)
    links = {l[0]: l for l in wf["links"]}

    def source(node_type, input_name):
        node = by_type[node_type]
        link = links[next(i["link"] for i in node["inputs"] if i["name"] == input_name)]
        return next(n["type"] for n in wf["nodes"] if n["id"] == link[1]), link[2]

    assert source("KSampler", "latent_image") == ("HarmonizeDiffHarmonyConditioning", 2)
    assert source("KSampler", "model") == ("HarmonizeDiffHarmonyNativeLoader", 0)
    assert source("HarmonizeRefine", "harmonized") == ("VAEDecode", 0)  # VAE Decode's image, unchanged
    assert source("HarmonizeRestore", "harmonized") == ("HarmonizeRefine", 0)
    assert source("SaveImage", "images") == ("HarmonizeRestore", 0)
    assert any(n["type"] in wr.NOTE_TYPES for n in wf["nodes"])
    for other in sorted((ROOT / "workflows").glob("*.json")):
        if other != NATIVE:
            assert not wr.needs_comfyui(json.loads(other.read_text())), other.name


def test_core_stand_ins_do_not_pretend_to_run():
    with pytest.raises(wr.NeedsComfyUIObjects):
        wr.KSampler().sample(model=None)
