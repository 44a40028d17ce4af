"""Inputs are checked once at the public entry point (core/images.py, "Checked once"): an all-in-one
DiffHarmony run with the refiner and detail transfer validates the composite once, and gives the same result
as the stages run one by one through their public (checking) functions."""
from __future__ import annotations

import pytest
import torch

from comfyui_harmonize.pipelines.color.restore import restore
from comfyui_harmonize.pipelines.core import images
from comfyui_harmonize.pipelines.diffharmony import pipeline as dh
from comfyui_harmonize.pipelines.diffharmony import refiner as rf


@pytest.fixture(scope="module")
def system(models_root):
    archive = models_root / "diffharmony" / "DiffHarmony"
    return dh.load_diffharmony(archive), rf.load_refiner(archive / "refinement")


def test_an_all_in_one_run_validates_the_composite_once(system, monkeypatch):
    sd, refiner = system
    g = torch.Generator().manual_seed(0)
    composite = torch.rand(1, 40, 56, 3, generator=g)
    mask = torch.zeros(1, 40, 56)
    mask[:, 10:30, 14:40] = 1
    seen, real = [], images.image_batch

    def counting(image, name="image"):
        if image.data_ptr() == composite.data_ptr():
            seen.append(name)
        return real(image, name)

    monkeypatch.setattr(images, "image_batch", counting)
    settings = dict(seed=3, steps=2, resolution=32, refine_resolution=32, detail="transfer")
    out = dh.harmonize(sd, composite, mask, refiner=refiner, **settings)
    assert seen == ["image"]  # once (it was five times: harmonize, encode, refine, restore, transfer_color)

    # the same run through the public, checking stage functions (each validates again) gives the same image
    latents = dh.encode(sd, composite, 32, seed=3)
    sampled = dh.sample(sd, latents, dh.latent_mask(mask, latents.shape[-2:]), 3, 2, "euler_ancestral", 1.0)
    staged = restore(rf.refine(refiner, dh.decode(sd, sampled), composite, mask, 32), composite, mask,
                     detail="transfer")
    assert torch.equal(out, staged)
    assert len(seen) > 1
