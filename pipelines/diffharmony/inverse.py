"""DiffHarmony's inverse model (the archive's ``inverse/``, the authors' "diffharmony-gen").

The same 9-channel inpainting UNet and pipeline as DiffHarmony, trained the other way round (their
``--mode inverse``): the condition is the REAL photo instead of the composite, the target the composite. Run
like DiffHarmony on a real photo and a mask, it repaints the masked object so that it no longer fits its
surroundings: an inharmonious composite of the photo, whose harmonious original is known. The authors use it
to augment their training data (scripts/inference/inverse.py: 5 Euler-ancestral steps, guidance 1, the
photo's background pasted back outside the mask, several rounds with different draws per mask).

Layout the loader accepts (the archive's ``inverse/`` is "a pipeline plus a UNet": the authors' training
script saves the trained UNet as ``weights-<step>/``, a diffusers ``UNet2DConditionModel`` folder, and their
inference script combines it with a pipeline, its ``--pretrained_model_name_or_path``):

- the UNet: ``weights-<step>/`` (the highest step; its own folder or its ``unet/``) when there is one, else
  the pipeline's ``unet/``, else a UNet config.json in ``inverse/`` itself;
- the VAE, text encoder, tokenizer and scheduler: from ``inverse/`` when it is a diffusers pipeline folder
  (model_index.json), else from the archive's ``base/`` beside it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch

from ..core import model_files
from ..core.errors import WeightsError
from ..core.weights import own_memory
from ..sd.loading import (SDComponents, load_component, diffharmony_base, is_diffusers_folder,
                          load_diffusers_folder)
from . import pipeline as dh

FOLDER = "inverse"


def _is_unet_folder(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return "in_channels" in data and "cross_attention_dim" in data


def find_inverse_models(roots) -> dict[str, Path]:
    """Folders under ``roots`` that hold an ``inverse/`` folder (the DiffHarmony archive)."""
    return model_files.find(roots, model_dir=lambda folder: (folder / FOLDER).is_dir())


def inverse_folder(path: str | os.PathLike) -> Path:
    """The ``inverse/`` folder itself, or the archive root (or its ``base/``) beside which it lies."""
    path = Path(path)
    cands = [path] if path.name == FOLDER else []
    cands.append(path / FOLDER)
    if path.name == "base":
        cands.append(path.parent / FOLDER)
    for cand in cands:
        if cand.is_dir():
            return cand
    raise WeightsError(f"no inverse model found: looked for {', '.join(map(str, cands))}. Expected the "
                       f"DiffHarmony archive's {FOLDER}/ folder (the authors' diffharmony-gen UNet) beside base/.")


def trained_unet_folder(folder: Path) -> Path | None:
    """The ``weights-<highest step>/`` UNet the authors' training script saved in ``folder`` (or None)."""
    steps = []
    for sub in folder.iterdir():
        m = re.fullmatch(r"weights-(\d+)", sub.name)
        for cand in (sub, sub / "unet"):
            if m and _is_unet_folder(cand):
                steps.append((int(m.group(1)), cand))
                break
    return max(steps)[1] if steps else None


def unet_folder(folder: Path) -> Path:
    """The inverse UNet inside ``folder``: weights-<highest step>/, else unet/, else the folder itself."""
    for cand in (trained_unet_folder(folder), folder / "unet", folder):
        if cand is not None and _is_unet_folder(cand):
            return cand
    raise WeightsError(f"{folder} holds no inverse UNet: expected weights-<step>/, unet/ or a UNet config.json "
                       f"(a diffusers UNet2DConditionModel with in_channels 9)")


def load_inverse(path: str | os.PathLike, dtype: torch.dtype = torch.float32, tokenizer_dir=None,
                 base: SDComponents | None = None) -> SDComponents:
    """The inverse model as DiffHarmony components (see the module docstring for which folder gives what);
    ``base`` stands in for the archive's ``base/`` when ``inverse/`` is not a pipeline folder."""
    from diffusers import UNet2DConditionModel

    folder = inverse_folder(path)
    ufolder = unet_folder(folder)
    if base is not None and not is_diffusers_folder(folder):
        unet = load_component(UNet2DConditionModel, ufolder.parent, ufolder.name, dtype)
        own_memory(unet).eval().requires_grad_(False)
        return dh.check_and_return(dataclasses.replace(base, unet=unet, source=str(ufolder), cache={}))
    pipeline = folder if is_diffusers_folder(folder) else diffharmony_base(folder.parent)
    if pipeline is None:
        raise WeightsError(f"{folder} holds only a UNet, and no base/ pipeline was found beside it in "
                           f"{folder.parent} for its VAE, text encoder and tokenizer")
    return dh.check_and_return(load_diffusers_folder(pipeline, dtype, tokenizer_dir, unet_folder=ufolder))


def make_composite(sd: SDComponents, real: torch.Tensor, mask: torch.Tensor, seed: int = 0,
                   steps: int = dh.DEFAULT_STEPS, resolution: int = dh.DEFAULT_RESOLUTION, square: bool = False,
                   condition_vae=None, callback=None, cancel=None) -> torch.Tensor:
    """Real photo IMAGE + MASK -> an inharmonious composite IMAGE at the photo's size: the inverse model run as
    DiffHarmony runs (Euler ancestral, guidance 1, empty prompt), the photo kept bit for bit outside the mask
    (the authors paste the real background back)."""
    return dh.harmonize(sd, real, mask, seed=seed, steps=steps, resolution=resolution, square=square,
                        condition_vae=condition_vae, callback=callback, cancel=cancel)
