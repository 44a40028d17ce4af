"""The one precision rule, shared by the loader nodes, the command line and the benchmark.

A ``dtype`` setting is one of :data:`DTYPES`: ``fp32``, ``fp16`` or ``bf16`` as written, or ``auto``:
the precision ComfyUI runs a Stable Diffusion 1.x/2.x UNet in on that device (its model management's
``unet_dtype``: fp16 where the device handles it well, else bf16 where supported, else fp32; ComfyUI's
``--fp16-unet``/``--bf16-unet``/``--fp32-unet`` are honoured). Outside ComfyUI (command line, benchmark,
tests) the same choice is made without its device tables: fp16 on CUDA, fp32 elsewhere. The host passes
ComfyUI's choice in as ``auto``; this module never imports ComfyUI.
"""
from __future__ import annotations

from typing import Callable

import torch

from .errors import InputError

DTYPES: dict[str, torch.dtype | None] = {"auto": None, "fp32": torch.float32, "fp16": torch.float16,
                                         "bf16": torch.bfloat16}


def default_dtype(device: torch.device | str) -> torch.dtype:
    """``auto`` without ComfyUI: fp16 on CUDA, fp32 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def resolve_dtype(name: str, device: torch.device | str,
                  auto: Callable[[torch.device], torch.dtype] | None = None) -> torch.dtype:
    """The torch dtype of setting ``name`` on ``device``; ``auto`` overrides :func:`default_dtype`."""
    if name not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    chosen = DTYPES[name]
    if chosen is not None:
        return chosen
    return (auto or default_dtype)(torch.device(device))
