"""Shared fixtures: tiny models written once per session in the layouts users have on disk."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # workflow_runner and the other test helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))  # tiny_models, synthetic (shared with benchmarks/)

import tiny_models  # noqa: E402
from synthetic import make_composite  # noqa: E402,F401  (tests import it from here)
from tiny_models import write_refiner  # noqa: E402

# The suite runs thousands of tiny tensor operations: one thread avoids OpenMP hand-offs that cost more than
# they save (an order of magnitude on a loaded 2-core machine). Tests that need another count set it locally.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    """models/ with diffharmony/DiffHarmony (the authors' archive layout: base/ with .bin weights,
    refinement/, condition_vae/, inverse/) and diffusers/tiny-inpaint (base/'s weights as safetensors)."""
    root = tmp_path_factory.mktemp("models")
    archive = root / "diffharmony" / "DiffHarmony"
    tiny_models.save_diffusers_pipeline(archive / "base", in_channels=9, weights="bin")
    write_refiner(archive / "refinement")
    tiny_models.write_condition_vae(archive / "condition_vae")
    tiny_models.write_inverse(archive / "inverse")
    tiny_models.save_diffusers_pipeline(root / "diffusers" / "tiny-inpaint", in_channels=9)
    tiny_models.save_diffusers_pipeline(root / "diffusers" / "tiny-txt2img", in_channels=4)
    (root / "checkpoints").mkdir()
    return root


@pytest.fixture
def models_env(models_root, monkeypatch):
    """Point the pack's model folders (outside ComfyUI) at the tiny models."""
    monkeypatch.setenv("HARMONIZE_MODELS_DIR", str(models_root))
    return models_root


SAMPLES = Path(__file__).resolve().parents[1] / "samples"
SAMPLE_FILES = ("harmonize_sample_cat.jpg", "harmonize_sample_cat_mask.png")  # what the shipped workflows load


def write_inputs(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The files the shipped workflows load (the pack's real sample composite and mask, 768x515) copied into
    ``folder``; returns the composite as ComfyUI's LoadImage gives it and the mask as its LoadImageMask
    (red channel) gives it."""
    import shutil

    import numpy as np
    from PIL import Image

    for name in SAMPLE_FILES:
        shutil.copyfile(SAMPLES / name, folder / name)
    rgb = np.asarray(Image.open(folder / SAMPLE_FILES[0]).convert("RGB"), dtype=np.float32) / 255.0
    red = np.asarray(Image.open(folder / SAMPLE_FILES[1]).convert("RGBA").getchannel("R"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb)[None], torch.from_numpy(red)[None]
