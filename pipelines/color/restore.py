"""Bring a harmonized result (any working size) back to the composite's own size and paste it in.

Outside the mask the output is the composite, bit for bit.
"""
from __future__ import annotations

import torch

from ..core import cancel as cancelling
from ..core import images
from ..core.errors import InputError
from .transfer import transfer_unchecked

DETAIL_MODES = ("resample", "transfer")


def restore(harmonized: torch.Tensor, composite: torch.Tensor, mask: torch.Tensor, feather: int = 0,
            detail: str = "resample", cancel: cancelling.Cancel = None) -> torch.Tensor:
    """``harmonized`` IMAGE at any size, ``composite`` IMAGE and ``mask`` at the output size.

    detail="resample": the harmonized image is resized (bilinear) to the composite's size.
    detail="transfer": the color change is fitted at the harmonized image's size and applied to the
    full-resolution composite, keeping its edges and texture (pipelines/color/transfer.py).
    ``cancel`` is checked per strip and per image (see transfer.transfer_color and images.paste).
    A composite whose mask is empty is returned unchanged, with a warning.
    """
    composite, harmonized, mask = images.composite_result_mask(composite, harmonized, mask)
    check_detail(detail)
    images.warn_empty(mask, "restore")
    cancelling.check(cancel)  # validating a 24-megapixel input takes seconds on a busy CPU
    return restore_unchecked(harmonized, composite, mask, feather, detail, cancel)


def check_detail(detail: str) -> None:
    if detail not in DETAIL_MODES:
        raise InputError(f"detail must be one of {DETAIL_MODES}, got {detail!r}")


def restore_unchecked(harmonized: torch.Tensor, composite: torch.Tensor, mask: torch.Tensor, feather: int = 0,
                      detail: str = "resample", cancel: cancelling.Cancel = None) -> torch.Tensor:
    """:func:`restore` on inputs already checked (``images.composite_result_mask``, ``check_detail``)."""
    if detail == "transfer":
        harmonized = transfer_unchecked(composite, harmonized, mask, cancel=cancel)
    out = images.paste(harmonized, composite, mask, feather, cancel)
    empty = images.empty_masks(mask)
    if bool(empty.any()):
        out = torch.where(empty[:, None, None, None], composite, out)
    return out
