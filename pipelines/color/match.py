"""A classical, weight-free harmonization baseline: global colour statistics matching in CIE Lab.

This is Reinhard et al.'s colour transfer ("Color Transfer between Images", IEEE CG&A 2001) restricted to
the pasted foreground: each Lab channel of the foreground is shifted and scaled so that its mean and
standard deviation equal the background's. It is NOT DiffHarmony and not a learned method: it moves the
foreground's global colour cast and contrast, nothing local (no shadows, no light direction). It is the
"colour match" row of harmonization benchmarks and a way to see the pack work without any weights.

``harmonize_color_match`` runs it the way the diffusion systems run: on the composite downscaled to a
working resolution, then brought back to the composite's own size by ``restore`` (``detail="transfer"``
applies the colour change to the full-resolution composite, so every edge and texture is kept).
"""
from __future__ import annotations

import torch
from kornia.color import lab_to_rgb, rgb_to_lab

from ..core import images
from .restore import check_detail, restore_unchecked

DEFAULT_RESOLUTION = 1024


def lab_color_match(image: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Reinhard colour transfer in CIE Lab: each channel of the foreground (mask >= 0.5) is shifted and
    scaled so its mean and standard deviation equal the background's. IMAGE ``[B,H,W,3]``, MASK
    ``[B,H,W]``; pixels outside the mask are returned unchanged; an empty or full mask leaves the image."""
    image, mask = images.image_and_mask(image, mask)
    out = image.clone()
    lab = rgb_to_lab(images.to_nchw(image))  # [B,3,H,W]
    for b in range(image.shape[0]):
        fg = mask[b] >= 0.5
        if not bool(fg.any()) or bool(fg.all()):
            continue
        x = lab[b].flatten(1)
        f, g = x[:, fg.flatten()], x[:, ~fg.flatten()]
        scale = g.std(dim=1, unbiased=False) / f.std(dim=1, unbiased=False).clamp_min(eps)
        moved = (lab[b] - f.mean(1)[:, None, None]) * scale[:, None, None] + g.mean(1)[:, None, None]
        rgb = lab_to_rgb(moved[None], clip=True)[0].permute(1, 2, 0)
        out[b] = torch.where(fg[..., None], rgb, image[b])
    return out


def harmonize_color_match(composite: torch.Tensor, mask: torch.Tensor, resolution: int = DEFAULT_RESOLUTION,
                          feather: int = 0, detail: str = "transfer") -> torch.Tensor:
    """The Lab colour match at a working resolution (``resolution`` on the long side, aspect kept; never
    upscaled), brought back to the composite's size by ``restore`` (``detail`` "transfer": the colour change
    applied to the full-resolution composite; "resample": the matched image resized). Outside the mask the
    output is the composite bit for bit; a composite whose mask is empty is returned unchanged, with a
    warning."""
    composite, mask = images.image_and_mask(composite, mask)
    check_detail(detail)
    images.warn_empty(mask, "colour match")
    h, w = composite.shape[1:3]
    size = (h, w)
    if max(h, w) > resolution:
        size = images.fit_size(h, w, resolution, multiple=1)
    small, small_mask = composite, mask
    if size != (h, w):
        small = images.resize_images(composite, size)
        small_mask = images.resize_masks(mask, size)
    matched = lab_color_match(small, small_mask)
    return restore_unchecked(matched, composite, mask, feather=feather, detail=detail)
