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
UNSAFE = "refused: this file would execute code when loaded"
ONLY_TENSORS = "Only plain tensor checkpoints (.safetensors, or .bin/.pt/.ckpt holding only tensors) are accepted."


def is_code_pickle(exc: BaseException) -> bool:
    """Whether ``exc`` is torch's safe unpickler refusing a pickle that holds Python objects (code to run),
    as opposed to a file that is not a pickle at all."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "unsupported global" in text.lower():
        return True
    return "Weights only load failed" in text and any(
        k in text for k in ("Unsupported global", "Unsupported operand", "GLOBAL", "Unsupported class"))


def without_unsafe_advice(text: str) -> str:
    """torch/transformers messages suggest ``weights_only=False``, i.e. running the pickle: never repeat it."""
    for marker in ("In PyTorch 2.6", "Re-running `torch.load`", "weights_only=False", "set `weights_only"):
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut]
    return text.strip().rstrip(".:") or "unreadable"


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def load_error(exc: BaseException, path, model: str | None = None) -> WeightsError:
    """One WeightsError for any failure to read a weights or config file: it names the file (and the
    model it belongs to) and says which kind of failure it was."""
    where = f"{path}" + (f" (model {model})" if model else "")
    if isinstance(exc, WeightsError):
        return exc
    if isinstance(exc, PermissionError):
        return WeightsError(f"cannot read {where}: permission denied. Give the user running ComfyUI read access.")
    if isinstance(exc, FileNotFoundError):
        return WeightsError(f"file not found: {where}")
    if any(is_code_pickle(e) for e in _chain(exc)):  # diffusers wraps torch's refusal in its own error
        return WeightsError(f"{UNSAFE}: {where}. {ONLY_TENSORS}")
    if isinstance(exc, ValueError) and ("JSON" in str(exc) or type(exc).__name__ == "JSONDecodeError"):
        return WeightsError(f"{where}: a config file is not valid JSON ({without_unsafe_advice(str(exc))})")
    if isinstance(exc, OSError) and exc.errno and exc.strerror:
        return WeightsError(f"cannot read {where}: {exc.strerror}")
    return WeightsError(f"could not load {where}: {without_unsafe_advice(str(exc))}")


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
    except (PermissionError, IsADirectoryError) as exc:
        raise load_error(exc, path) from None
    except Exception as exc:  # corrupt / truncated / not a checkpoint at all, or a pickle carrying code
        if is_code_pickle(exc):
            raise WeightsError(f"{UNSAFE}: {path} holds Python objects other than tensors. {ONLY_TENSORS}") from None
        raise WeightsError(f"could not read weights file {path}: it is corrupt or not a checkpoint "
                           f"({without_unsafe_advice(str(exc))})") from exc
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return obj


LISTED = 12  # keys named per kind of mismatch in a strict-load error


def check_keys(own: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor], source: str, target: str,
               unexpected_ok: bool = False) -> None:
    """The strict-load diagnosis of the pack: raise a WeightsError saying how the weights in ``source`` differ
    from ``target``'s state dict ``own`` (shape mismatches, missing keys and, unless ``unexpected_ok``,
    unexpected keys: how many of each and the first :data:`LISTED` of them)."""
    wrong = [f"{k} (file {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)})"
             for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state_dict]
    unexpected = [] if unexpected_ok else [k for k in state_dict if k not in own]
    parts = [f"{len(keys)} {what}: " + ", ".join(keys[:LISTED]) + (f", ... ({len(keys) - LISTED} more)"
                                                                      if len(keys) > LISTED else "")
             for keys, what in ((wrong, "shape mismatches"), (missing, "missing keys"),
                                (unexpected, "unexpected keys")) if keys]
    if parts:
        raise WeightsError(f"weights in {source} do not fit {target}: " + "; ".join(parts))


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``state_dict`` strictly; on mismatch say which keys/shapes differ and from which file."""
    check_keys(model.state_dict(), state_dict, source, f"the {type(model).__name__} built from its config")
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
