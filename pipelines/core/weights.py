"""Safe state-dict loading: safetensors, or torch.load(weights_only=True). No pickle is ever executed."""
from __future__ import annotations

import contextlib
import os
import pickle

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from torch import nn

from .errors import WeightsError

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def load_state_dict(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """Read a state dict from ``path``; raise WeightsError naming the file on any problem."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    lower = path.lower()
    try:
        if lower.endswith(SAFE_SUFFIXES):
            return load_file(path, device=map_location)
        if lower.endswith(PICKLE_SUFFIXES):
            obj = torch.load(path, map_location=map_location, weights_only=True)
        else:
            raise WeightsError(
                f"unsupported weights file type: {path} (expected .safetensors, .bin, .pt, .pth or .ckpt)"
            )
    except WeightsError:
        raise
    except pickle.UnpicklingError as exc:
        if "unsupported global" not in str(exc).lower():  # not a pickle of tensors at all: garbage bytes
            raise WeightsError(f"could not read weights file {path}: it is corrupt or not a checkpoint ({exc})") from exc
        raise WeightsError(
            f"refused to load {path}: it contains Python objects other than tensors, and loading it would "
            f"execute code. Only plain tensor checkpoints (or .safetensors) are accepted. ({exc})"
        ) from exc
    except Exception as exc:  # corrupt / truncated / not a checkpoint at all
        raise WeightsError(f"could not read weights file {path}: it is corrupt or not a checkpoint ({exc})") from exc
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return obj


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``state_dict`` strictly; on mismatch say which keys/shapes differ and from which file."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (first: {wrong[0]})")
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        raise WeightsError(
            f"weights in {source} do not fit the {type(model).__name__} built from its config: " + "; ".join(parts)
        )
    model.load_state_dict(state_dict, strict=True, assign=_is_meta(model))
    return model


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


@contextlib.contextmanager
def empty_weights():
    """Build modules without allocating/initialising parameters (they are filled by ``load_into``)."""

    with init_empty_weights(include_buffers=False):
        yield


def own_memory(module: nn.Module) -> nn.Module:
    """Copy parameters that still point into a memory-mapped file into ordinary, aligned allocations.

    Loaders memory-map safetensors files, so tensors start at whatever offset the file gives them; CPU
    kernels pick their code path by alignment and then differ in the last bits. Owning aligned memory makes
    the same weights give bit-identical results whatever file they came from (and frees the file)."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                tensor.data = tensor.data.clone()
    return module
