"""What the command-line entry points share: the precision option (the pack's one rule), the tokenizer
default, and how an error ends a command (a message on stderr and exit status 2, never a traceback)."""
from __future__ import annotations

import os
import sys

from ..pipelines.core.dtypes import DTYPES

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
