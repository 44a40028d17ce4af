"""--preprocess official: the tensors reaching the UNet and the refiner equal, bit for bit, those of a reference
that follows the authors' loader and inference script step by step."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from comfyui_harmonize.pipelines.diffharmony import official
from comfyui_harmonize.pipelines.diffharmony import pipeline as dh
from comfyui_harmonize.pipelines.diffharmony import refiner as rf
from conftest import make_composite

RES, OUT = 64, 32


@pytest.fixture(scope="module")
def archive(models_root):
    return models_root / "diffharmony" / "DiffHarmony"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An 8-bit composite and a soft-edged greyscale mask, as files (the loader's input)."""
    folder = tmp_path_factory.mktemp("official")
    image, _ = make_composite(77, 101, seed=12)
    Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(folder / "c.png")
    yy, xx = np.meshgrid(np.linspace(-1, 1, 77), np.linspace(-1, 1, 101), indexing="ij")
    soft = np.clip(1.5 - 2.2 * np.sqrt((yy / 0.7) ** 2 + (xx / 0.6) ** 2), 0, 1)  # a wide soft edge
    Image.fromarray((soft * 255).round().astype(np.uint8), "L").save(folder / "m.png")
    return folder / "c.png", folder / "m.png"


def loader_reference(comp_path, mask_path, res):
    """The authors' IhdDatasetMultiRes.__getitem__ at one resolution, with the PIL calls it makes
    (torchvision's TF.resize on a PIL image is ``img.resize((w, h), BILINEAR)``; ToTensor; Normalize)."""
    comp = Image.open(comp_path).convert("RGB")
    mask = Image.open(mask_path).convert("1")
    if comp.size != (res, res):
        comp, mask = comp.resize((res, res), Image.BILINEAR), mask.resize((res, res), Image.BILINEAR)
    c = torch.from_numpy(np.array(comp)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    c = (c - 0.5) / 0.5
    m = torch.from_numpy(255 * np.array(mask, np.uint8)).to(torch.float32).div(255)[None]
    return c[None], (m >= 0.5).float()[None]


def encode_seed(seed):
    return int.from_bytes(hashlib.sha256(f"{seed}/encode".encode()).digest()[:8], "little") & (2**63 - 1)


def test_unet_and_refiner_inputs_equal_the_authors_loader_bit_for_bit(archive, files):
    sd = dh.load_diffharmony(archive)
    refiner = rf.load_refiner(archive / "refinement")
    seen = {"unet": [], "refiner": []}
    hooks = [sd.unet.register_forward_pre_hook(lambda m, a: seen["unet"].append(a[0].clone())),
             refiner.register_forward_pre_hook(lambda m, a: seen["refiner"].append(a[0].clone()))]
    try:
        inputs = official.prepare_files(*files, RES, OUT)
        got = official.harmonize(sd, inputs, seed=3, steps=2, refiner=refiner)
    finally:
        for h in hooks:
            h.remove()
    comp, mask = loader_reference(*files, RES)
    comp_out, mask_out = loader_reference(*files, OUT)
    with torch.no_grad():
        sf = sd.vae.config.scaling_factor
        lat = sd.vae.encode(comp).latent_dist.sample(generator=torch.Generator().manual_seed(encode_seed(3)))
        lmask = F.interpolate(mask, size=(RES // 8, RES // 8))  # the pipeline's resize (nearest)
        for x in seen["unet"]:  # every step: [noisy latents, mask, composite latents]
            assert torch.equal(x[:, 4:5], lmask) and torch.equal(x[:, 5:], lat * sf)
        out = dh.sample(sd, lat, lmask[:, 0], seed=3, steps=2)
        image = (sd.vae.decode(out).sample / 2 + 0.5).clamp(0, 1)
        h = F.interpolate(2 * image - 1, size=(OUT, OUT), mode="bilinear", align_corners=False,
                          antialias=True).clamp(-1, 1)
        want_rin = torch.cat([h, mask_out, comp_out], 1)
        assert len(seen["refiner"]) == 1 and torch.equal(seen["refiner"][0], want_rin)
        want = ((refiner(want_rin).clamp(-1, 1) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    assert got.shape == (1, OUT, OUT, 3) and torch.equal(got, want)


def test_dithered_mask_differs_from_the_pack_threshold_and_tensors_match_files(files):
    comp_path, mask_path = files
    inputs = official.prepare_files(comp_path, mask_path, RES, OUT)
    soft = torch.from_numpy(np.array(Image.open(mask_path), np.float32) / 255)[None]
    image = torch.from_numpy(np.array(Image.open(comp_path), np.float32) / 255)[None]
    thresholded = (F.interpolate(soft[:, None], size=(OUT, OUT), mode="bilinear", antialias=True) >= 0.5).float()
    assert (inputs.mask_out != thresholded).any()  # dithering scatters the soft edge
    again = official.prepare_tensors(image, soft, RES, OUT)  # from ComfyUI's IMAGE / MASK of the same files
    for name in ("composite", "mask", "composite_out", "mask_out"):
        assert torch.equal(getattr(again, name), getattr(inputs, name)), name


def test_condition_vae_decode_gets_the_loader_condition(archive, files):
    from comfyui_harmonize.pipelines.diffharmony import condition_vae as cv

    sd = dh.load_diffharmony(archive)
    cvae = cv.load_condition_vae(archive)
    seen = []
    hook = cvae.conditional_encoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        got = official.harmonize(sd, official.prepare_files(*files, RES, OUT), seed=1, steps=1, condition_vae=cvae)
    finally:
        hook.remove()
    comp, mask = loader_reference(*files, RES)
    assert len(seen) == 1 and torch.equal(seen[0], torch.cat([comp, mask], 1))
    assert got.shape == (1, RES, RES, 3)


def test_all_in_one_node_official_is_the_authors_run_per_composite(archive, files):
    from comfyui_harmonize.nodes import diffharmony as N

    sd = dh.load_diffharmony(archive)
    refiner = rf.load_refiner(archive / "refinement")
    comp_path, mask_path = files
    image = torch.from_numpy(np.array(Image.open(comp_path), np.float32) / 255)[None]
    soft = torch.from_numpy(np.array(Image.open(mask_path), np.float32) / 255)[None]
    other = image.flip(2)
    node = N.HarmonizeDiffHarmony()
    args = (sd, torch.cat([image, other]), soft, 4, 2, "euler_ancestral", 1.0, RES, "keep aspect", OUT, 0,
            "resample")
    (got,) = node.harmonize(*args, preprocess="official", refiner=refiner)
    for i, comp in enumerate((image, other)):  # each composite as the authors' script runs a file, same seed
        want = official.harmonize(sd, official.prepare_tensors(comp, soft, RES, OUT), seed=4, steps=2,
                                  refiner=refiner)
        assert torch.equal(got[i:i + 1], want)
    assert got.shape == (2, OUT, OUT, 3)
    (plain,) = node.harmonize(sd, image, *args[2:], preprocess="official")  # no refiner: the R square
    assert plain.shape == (1, RES, RES, 3)
    (pack,) = node.harmonize(sd, image, *args[2:], refiner=refiner)  # the default keeps the pack's path
    assert pack.shape == image.shape


def test_all_in_one_node_official_checks_before_any_work(archive, files):
    from comfyui_harmonize.nodes import diffharmony as N
    from comfyui_harmonize.pipelines.core.errors import InputError

    sd = dh.load_diffharmony(archive)
    refiner = rf.load_refiner(archive / "refinement")
    calls = []
    hook = sd.vae.register_forward_pre_hook(lambda m, a: calls.append(1))
    image, mask = make_composite(40, 48, seed=2)
    base = (sd, image, mask, 0, 1, "euler_ancestral", 1.0, RES, "keep aspect")
    try:
        with pytest.raises(InputError, match="preprocess must be one of pack, official"):
            N.HarmonizeDiffHarmony().harmonize(*base, OUT, 0, "resample", preprocess="authors")
        with pytest.raises(InputError, match="refine resolution must be a positive multiple of 16"):
            N.HarmonizeDiffHarmony().harmonize(*base, 40, 0, "resample", preprocess="official", refiner=refiner)
        with pytest.raises(InputError, match="mask"):
            N.HarmonizeDiffHarmony().harmonize(*base[:2], mask[:, :20], *base[3:], OUT, 0, "resample",
                                               preprocess="official")
    finally:
        hook.remove()
    assert not calls
