"""Cancel points for long stages.

A pipeline function that can run for more than a second takes ``cancel``: a callable with no arguments
that returns when the work may go on and raises (any exception) when the user asked to stop. Pipelines
never know what stops them; in ComfyUI the nodes pass ``host.check_interrupt``, which raises ComfyUI's
interrupt exception. ``None`` means "never cancelled".

Loops call ``check(cancel)`` once per step, strip, solver iteration or request poll. A single model
forward (a VAE encode or decode at 2048 px, the refiner) is one long call with no loop of ours around
it, so ``inside(module, cancel)`` puts a cancel point before every block of the network (every diffusers
``*Block2D`` module: each resnet, attention and up/down block), which also covers every tile of a tiled VAE.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

Cancel = Optional[Callable[[], None]]
BLOCK_SUFFIX = "Block2D"  # diffusers' ResnetBlock2D, DownEncoderBlock2D, UNetMidBlock2D, UpBlock2D, ...


def check(cancel: Cancel) -> None:
    """One cancel point: raises whatever ``cancel`` raises."""
    if cancel is not None:
        cancel()


@contextlib.contextmanager
def inside(module: torch.nn.Module, cancel: Cancel):
    """While the context is open, every forward of a block of ``module`` (see the module docstring), and
    the forward of ``module`` itself, first calls ``cancel``. The hooks are removed on exit, also when
    ``cancel`` raised."""
    if cancel is None:
        yield
        return
    blocks = [module] + [m for m in module.modules() if m is not module and type(m).__name__.endswith(BLOCK_SUFFIX)]
    handles = [m.register_forward_pre_hook(lambda _m, _args: cancel()) for m in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
