"""Stable Diffusion models as users have them: the one entry point that loads any of them and the list of
those in model folders. A folder (a diffusers pipeline, the DiffHarmony archive root) goes to
loading.py, a single-file checkpoint to single_file.py."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..core import model_files
from ..core.errors import WeightsError
from .loading import SDComponents, diffharmony_base, is_diffusers_folder, load_diffusers_folder
from .single_file import load_single_file


def load_sd(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
            tokenizer_dir: str | os.PathLike | None = None) -> SDComponents:
    """Load from a diffusers folder, the DiffHarmony archive root, or a single-file checkpoint."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"model not found: {path}")
    if path.is_file():
        return load_single_file(path, dtype=dtype, tokenizer_dir=tokenizer_dir)
    return load_diffusers_folder(path, dtype=dtype, tokenizer_dir=tokenizer_dir)


def is_sd_model_folder(path: Path) -> bool:
    """A diffusers pipeline folder or a DiffHarmony archive root (with base/)."""
    return is_diffusers_folder(path) or diffharmony_base(path) is not None


def find_models(roots: list[str | os.PathLike], files: bool = True) -> dict[str, Path]:
    """Models under ``roots``: diffusers folders, DiffHarmony archives (folders with base/) and, with
    ``files``, single-file ``.safetensors`` checkpoints. Names are paths relative to their root."""
    return model_files.find(roots, model_dir=is_sd_model_folder, file_suffixes=(".safetensors",) if files else ())
