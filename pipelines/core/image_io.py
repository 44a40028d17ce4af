"""Reading and writing image files as ComfyUI-style tensors: the one reader of the command line, the
iHarmony4 benchmark, the training data and the benchmarks, so a file reads the same everywhere."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except FileNotFoundError:
        raise InputError(f"{what} file not found: {path}") from None
    except Exception as exc:
        raise InputError(f"cannot read {what} {path}: {exc}") from exc


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as ``[H,W,3]`` float32 0..1: EXIF orientation applied, alpha dropped, grey expanded."""
    img = _open(path, "image").convert("RGB")
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)


def read_mask(path: str | os.PathLike) -> torch.Tensor:
    """A mask file as ``[H,W]`` float32 0..1, white = foreground, grey levels kept (binarise where needed).

    The rule: when the file has an alpha channel that is not fully opaque, the alpha channel is the mask
    (a cut-out saved with transparency); otherwise the luminance. EXIF orientation is applied as for images.
    """
    img = _open(path, "mask")
    if "A" in img.getbands():
        alpha = np.asarray(img.getchannel("A"), dtype=np.float32)
        if alpha.min() < 255:
            return torch.from_numpy(alpha / 255.0)
    return torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """IMAGE ``[1,H,W,3]`` float32 0..1 of an image file (see :func:`read_image`)."""
    return read_image(path)[None].contiguous()


def load_mask(path: str | os.PathLike) -> torch.Tensor:
    """MASK ``[1,H,W]`` 0..1 of a mask file (see :func:`read_mask` for the alpha/luminance rule)."""
    return read_mask(path)[None].contiguous()


def free_path(path: str | os.PathLike) -> Path:
    """``path`` if nothing exists there, else ``stem_1.ext``, ``stem_2.ext``... (never overwrites)."""
    path = Path(path)
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    return candidate


def save_image(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Save IMAGE ``[H,W,3]`` or ``[1,H,W,3]`` (0..1) as 8-bit; returns the path written (a new name when
    ``path`` exists)."""
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise InputError(f"save_image takes one image, got a batch of {image.shape[0]}")
        image = image[0]
    arr = (image.clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    target = free_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "xb") as f:  # "x": fail rather than overwrite if something appeared meanwhile
        Image.fromarray(arr).save(f, format=Image.registered_extensions().get(target.suffix.lower(), "PNG"))
    return target
