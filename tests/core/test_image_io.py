"""The one image-file reader: the command line, the iHarmony4 benchmark and the training data read a file
the same way (EXIF orientation, alpha-or-luminance mask rule)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_harmonize.pipelines.core import image_io
from comfyui_harmonize.pipelines.core.errors import InputError
from comfyui_harmonize.pipelines.ihd import dataset as ihd


def test_image_values_and_exif_orientation(tmp_path):
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    img = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    img.save(tmp_path / "plain.png")
    plain = image_io.read_image(tmp_path / "plain.png")
    assert plain.dtype == torch.float32 and plain.shape == (2, 3, 3)
    assert torch.equal(plain, torch.from_numpy(rgb).float() / 255.0)
    assert image_io.read_image(tmp_path / "rot.jpg").shape == (3, 2, 3)  # displayed upright, as ComfyUI loads it
    assert image_io.load_image(tmp_path / "plain.png").shape == (1, 2, 3, 3)


def test_mask_rule_alpha_when_not_opaque_else_luminance(tmp_path):
    # a coloured cut-out: the colours vary, the alpha carries the object (15 of 64 pixels)
    rgba = np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[2:5, 2:7, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    m = image_io.read_mask(tmp_path / "cutout.png")
    assert m.shape == (8, 8) and float(m.sum()) == 15.0
    # fully opaque RGBA and plain grey: the luminance, grey levels kept
    grey = np.zeros((8, 8), np.uint8)
    grey[1:3, 1:3] = 128
    opaque = np.dstack([grey, grey, grey, np.full((8, 8), 255, np.uint8)])
    Image.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    for name in ("opaque.png", "grey.png"):
        got = image_io.read_mask(tmp_path / name)
        assert torch.equal(got, torch.from_numpy(grey).float() / 255.0), name
    assert image_io.load_mask(tmp_path / "grey.png").shape == (1, 8, 8)


def test_missing_and_unreadable_files_name_the_file(tmp_path):
    with pytest.raises(InputError, match="mask file not found: .*nope.png"):
        image_io.read_mask(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read image .*bad.png"):
        image_io.read_image(tmp_path / "bad.png")


def test_benchmark_samples_use_the_same_reader(tmp_path):
    root = tmp_path / "ihd"
    for sub in ("composite_images", "masks", "real_images"):
        (root / "HCOCO" / sub).mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(root / "HCOCO/composite_images/c1_1_1.png")
    Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(root / "HCOCO/real_images/c1.jpg")
    cut = np.zeros((6, 5, 4), np.uint8)
    cut[..., :3] = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    cut[1:4, 1:3, 3] = 255
    Image.fromarray(cut, "RGBA").save(root / "HCOCO/masks/c1_1.png")
    sample = ihd.make_sample(root, "c1_1_1.png")
    d = ihd.load_sample(sample)
    assert torch.equal(d["composite"], image_io.load_image(sample.composite))
    assert torch.equal(d["real"], image_io.load_image(sample.real))
    assert torch.equal(d["mask"], image_io.load_mask(sample.mask))
    assert float(d["mask"].sum()) == 6.0
