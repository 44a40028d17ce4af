"""Reading and writing image files as ComfyUI-style tensors: the one reader of the command line, the
iHarmony4 benchmark, the training data and the benchmarks, so a file reads the same everywhere.

Bit depths: 8-bit files are divided by 255; 16-bit files (grey PNG/TIFF, Pillow modes ``I;16*``, and
``I`` as PNG gives 16-bit grey) by 65535, never clipped; float files (mode ``F``) are taken as they are
when they lie in 0..1, and a float file holding 0..255 or 0..65535 values is scaled by 1/255 or
1/65535 with a warning. 16-bit RGB files are read by Pillow as 8-bit RGB (scaled, not clipped)."""
from __future__ import annotations

import os
import warnings
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


HIGH_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def _single_channel(img: Image.Image, path, what: str) -> np.ndarray:
    """A 16-bit or float single-channel image as ``[H,W]`` float32 0..1 (see the module docstring)."""
    arr = np.asarray(img).astype(np.float32)
    if img.mode != "F":
        return np.clip(arr / 65535.0, 0.0, 1.0)
    if not np.isfinite(arr).all():
        raise InputError(f"{what} {path} holds NaN or infinite values; expected finite values in 0..1")
    top, low = float(arr.max()), float(arr.min())
    if low < 0.0:
        raise InputError(f"{what} {path} is a float image with negative values (min {low:g}); expected 0..1")
    if top <= 1.0:
        return arr
    for scale in (255.0, 65535.0):
        if top <= scale:
            warnings.warn(f"{what} {path} is a float image with values up to {top:g}; read as 0..{scale:g} and "
                          f"divided by {scale:g}")
            return arr / scale
    raise InputError(f"{what} {path} is a float image with values up to {top:g}; expected 0..1 (or 0..255, 0..65535)")


def read_image(path: str | os.PathLike, what: str = "image") -> torch.Tensor:
    """An image file as ``[H,W,3]`` float32 0..1: EXIF orientation applied, alpha dropped, grey expanded,
    16-bit and float files scaled (see the module docstring). ``what`` names the file in errors."""
    img = _open(path, what)
    if img.mode in HIGH_DEPTH_MODES:
        grey = _single_channel(img, path, what)
        return torch.from_numpy(np.repeat(grey[..., None], 3, axis=-1))
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)


def read_mask(path: str | os.PathLike) -> torch.Tensor:
    """A mask file as ``[H,W]`` float32 0..1, white = foreground, grey levels kept (binarise where needed).

    The rule: when the file has an alpha channel that is not fully opaque, the alpha channel is the mask
    (a cut-out saved with transparency); otherwise the luminance. EXIF orientation is applied as for images.
    """
    img = _open(path, "mask")
    if img.mode in HIGH_DEPTH_MODES:
        return torch.from_numpy(_single_channel(img, path, "mask"))
    if "A" in img.getbands():
        alpha = np.asarray(img.getchannel("A"), dtype=np.float32)
        if alpha.min() < 255:
            return torch.from_numpy(alpha / 255.0)
    return torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)


def image_size(path: str | os.PathLike, what: str = "image") -> tuple[int, int]:
    """(height, width) of an image file as :func:`read_image` gives it, from the header alone (EXIF rotations
    by 90 degrees swap the sides), or InputError naming the file."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.getexif().get(0x0112) in (5, 6, 7, 8):
                w, h = h, w
            return h, w
    except FileNotFoundError:
        raise InputError(f"{what} file not found: {path}") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise InputError(f"cannot read {what} {path}: {exc}") from None


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
