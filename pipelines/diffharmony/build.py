"""DiffHarmony (+ its refiner, + its condition VAE) from settings: the one builder of the command line and
the benchmark."""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch

from ..sd.loading import SDComponents
from .condition_vae import ConditionVAE, load_condition_vae
from .pipeline import load_diffharmony
from .refiner import RefinerUNet, load_refiner


class DiffHarmonySystem(NamedTuple):
    sd: SDComponents
    refiner: RefinerUNet | None
    condition_vae: ConditionVAE | None


def chosen_refiner(model: str | os.PathLike, refiner: str | os.PathLike | None = None,
                   no_refine: bool = False) -> Path | None:
    """The refiner to use: none with ``no_refine``, else ``refiner`` when given, else the archive's own
    ``refinement/`` folder when ``model`` has one."""
    if no_refine:
        return None
    if refiner:
        return Path(refiner)
    auto = Path(model) / "refinement"
    return auto if auto.is_dir() else None


def build_diffharmony(model: str | os.PathLike, *, refiner: str | os.PathLike | None = None,
                      no_refine: bool = False, condition_vae: bool = False,
                      condition_vae_path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu",
                      tokenizer_dir: str | os.PathLike | None = None) -> DiffHarmonySystem:
    """Load DiffHarmony from ``model`` (archive, diffusers folder or single file), its refiner (see
    :func:`chosen_refiner`) and, with ``condition_vae``, its condition VAE (``condition_vae_path``, else the
    one found beside the model) in ``dtype``, and move them to ``device``."""
    sd = load_diffharmony(model, dtype=dtype, tokenizer_dir=tokenizer_dir)
    for module in sd.modules().values():
        module.to(device)
    folder = chosen_refiner(model, refiner, no_refine)
    ref = load_refiner(folder, dtype=dtype).to(device) if folder is not None else None
    cvae = load_condition_vae(condition_vae_path or sd.source, dtype).to(device) if condition_vae else None
    return DiffHarmonySystem(sd, ref, cvae)
