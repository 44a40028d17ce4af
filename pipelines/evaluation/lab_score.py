"""A training-free harmony score: the colour statistics of the foreground against the background around it,
in CIE Lab (the zero-shot loop's default evaluator; the trained one is evaluator.py)."""
from __future__ import annotations

import math

import kornia
import torch
import torch.nn.functional as F

from ..core import images
from ..core.errors import InputError


class LabStatisticsScore:
    """Training-free harmony score: how well the foreground's colour statistics agree with the background
    around it, in CIE Lab.

    The image is analysed at ``analysis_size`` on the long side. The reference region is a ring of
    background around the mask (``ring`` x the square root of the mask's area wide, at least 2 pixels;
    all of the background when the ring is empty). With means mu and standard deviations sigma over the
    foreground (mask-weighted) and the ring:

        d = sum_{c in L,a,b} ((mu_fg,c - mu_ring,c) / scale)^2 + (ln(sigma_fg,L / sigma_ring,L))^2
        score = exp(-d)                                       (1 = identical statistics, -> 0 as they differ)

    with ``scale`` = 20 Lab units. It rewards a foreground whose lightness, colour cast and contrast match
    its surroundings: a proxy for the global colour/illumination mismatch harmonization removes. It does
    not judge semantics (a red object on green grass is not a mismatch to fix) — the trained evaluator
    does. An image whose mask is empty or covers everything scores 1 (nothing to compare)."""

    name = "Lab statistics (training-free)"

    def __init__(self, ring: float = 0.25, scale: float = 20.0, analysis_size: int = 256):
        if ring <= 0 or scale <= 0 or analysis_size < 8:
            raise InputError("ring and scale must be > 0 and analysis_size >= 8")
        self.ring, self.scale, self.analysis_size = float(ring), float(scale), int(analysis_size)

    def __call__(self, images_bhwc: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        img, mask = images.image_and_mask(images_bhwc, masks)
        h, w = img.shape[1:3]
        scale = min(1.0, self.analysis_size / max(h, w))
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = images.resize_nchw(images.to_nchw(img), size).clamp(0, 1)
        m = images.resize_nchw(mask[:, None], size)[:, 0].clamp(0, 1)
        lab = kornia.color.rgb_to_lab(x)  # [B,3,h,w], L 0..100
        scores = []
        for b in range(img.shape[0]):
            fg = m[b]
            hard = (fg >= 0.5).float()
            area = float(hard.sum())
            if area == 0 or area == hard.numel():
                scores.append(1.0)
                continue
            r = max(2, int(round(self.ring * math.sqrt(area))))
            dil = F.max_pool2d(hard[None, None], 2 * r + 1, stride=1, padding=r)[0, 0]
            ring = dil * (1 - hard)
            if ring.sum() == 0:
                ring = 1 - hard
            mu_f, sd_f = _weighted_stats(lab[b], fg)
            mu_r, sd_r = _weighted_stats(lab[b], ring)
            d = (((mu_f - mu_r) / self.scale) ** 2).sum() + torch.log((sd_f[0] + 1e-3) / (sd_r[0] + 1e-3)) ** 2
            scores.append(float(torch.exp(-d)))
        return torch.tensor(scores, dtype=torch.float32)

    def __repr__(self) -> str:
        return f"LabStatisticsScore(ring={self.ring}, scale={self.scale})"


def _weighted_stats(lab: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    wsum = weight.sum().clamp_min(1e-8)
    mu = (lab * weight).flatten(1).sum(1) / wsum
    var = (((lab - mu[:, None, None]) ** 2) * weight).flatten(1).sum(1) / wsum
    return mu, var.clamp_min(0).sqrt()
