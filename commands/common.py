"""What the command-line entry points share: the precision option (the pack's one rule), the tokenizer
default, the --device check, and how an error ends a command (a message on stderr and exit status 2, never a
traceback)."""
from __future__ import annotations

import os
import sys

import torch

from ..pipelines.core.dtypes import DTYPES
from ..pipelines.core.errors import InputError

DTYPE_HELP = ("precision: " + ", ".join(DTYPES) + "; auto = fp16 on CUDA, fp32 elsewhere "
              "(inside ComfyUI the nodes' auto follows ComfyUI's choice for SD UNets)")


def tokenizer_dir(given: str | None) -> str | None:
    """``--tokenizer``, else ComfyUI's bundled CLIP tokenizer when ``$COMFYUI_PATH`` names a checkout."""
    comfy = os.environ.get("COMFYUI_PATH")
    return given or (os.path.join(comfy, "comfy", "sd1_tokenizer") if comfy else None)


def fail(prog: str, exc: BaseException) -> int:
    """Report a user error (bad input, missing or wrong weights, unreadable files) and return exit status 2."""
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 2


def check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device; expected cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available here (this torch has no CUDA or sees no "
                             f"GPU); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InputError(f"--device {name}: Apple MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise InputError(f"--device {name}: expected cpu, cuda, cuda:N or mps")
    return device
