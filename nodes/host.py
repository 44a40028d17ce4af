"""The one place that talks to ComfyUI. Every import of ComfyUI is lazy and has a plain-torch fallback,
so every node also runs (and is tested) without ComfyUI installed."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import os
import weakref

import torch

from ..pipelines.core import dtypes, model_files
from ..pipelines.sd.models import find_models

MODELS_ENV = "HARMONIZE_MODELS_DIR"  # models root used when ComfyUI is not importable (tests, CLI)

# Model folders the pack registers with ComfyUI, next to the built-in ones it also reads.
PACK_FOLDERS = ("diffharmony", "pidinet", "harmony_evaluator", "LLM")  # LLM: local VLMs, as other VLM packs use


def _comfy(name: str):
    """Import a ComfyUI module, or return None outside ComfyUI."""
    try:
        import importlib

        return importlib.import_module(name)
    except Exception:  # not in ComfyUI, or ComfyUI failed to import: plain torch behaviour
        return None


def in_comfy() -> bool:
    return _comfy("folder_paths") is not None and _comfy("comfy.model_management") is not None


# ----------------------------------------------------------------------------------------- progress
def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed cancel (no-op outside ComfyUI)."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


class Progress:
    """``callback(step, total)`` for pipeline loops: drives ComfyUI's progress bar and is a cancel point."""

    def __init__(self, total: int):
        self.total = max(int(total), 1)
        utils = _comfy("comfy.utils")
        self._bar = utils.ProgressBar(self.total) if utils is not None else None
        self.steps = 0

    def __call__(self, step: int | None = None, total: int | None = None) -> None:
        check_interrupt()
        self.steps = self.steps + 1 if step is None else int(step)
        if total is not None:
            self.total = max(int(total), 1)
        if self._bar is not None:
            self._bar.update_absolute(min(self.steps, self.total), self.total)


# ------------------------------------------------------------------------------------------ devices
def torch_device() -> torch.device:
    mm = _comfy("comfy.model_management")
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device() -> torch.device:
    mm = _comfy("comfy.model_management")
    if mm is not None:
        return mm.unet_offload_device()
    return torch.device("cpu")


def intermediate_device() -> torch.device:
    mm = _comfy("comfy.model_management")
    if mm is not None:
        return mm.intermediate_device()
    return torch.device("cpu")


_patchers: "weakref.WeakKeyDictionary[torch.nn.Module, object]" = weakref.WeakKeyDictionary()


def load_to_device(module: torch.nn.Module) -> torch.device:
    """Put ``module`` on the compute device. In ComfyUI it is handed to model management (wrapped in a
    ModelPatcher once), which accounts for its memory and may evict it or other models later; outside
    ComfyUI it is simply moved. Returns the device to compute on."""
    device = torch_device()
    mm = _comfy("comfy.model_management")
    mp = _comfy("comfy.model_patcher")
    if mm is not None and mp is not None:
        patcher = _patchers.get(module)
        if patcher is None:
            patcher = mp.ModelPatcher(module, load_device=device, offload_device=offload_device())
            _patchers[module] = patcher
        mm.load_models_gpu([patcher])
    else:
        module.to(device)
    if not torch.is_inference_mode_enabled():  # inside autograd(): weights must be able to take part
        _materialize(module)
    return device


# ------------------------------------------------------------------------------------------ autograd
@contextlib.contextmanager
def autograd():
    """Gradients inside a node. ComfyUI runs every node under ``torch.inference_mode()``: there
    ``requires_grad`` records nothing, and a tensor made in that mode (another node's output, weights a
    loader node created or model management moved) cannot be saved for backward. Inside this context
    inference mode is off and gradients are on; outside ComfyUI it only enables gradients."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def normal(obj):
    """``obj`` with every inference-mode tensor replaced by a normal copy (through dicts, lists, tuples and
    dataclasses; modules are left to load_to_device). Containers without such tensors are returned as they
    are, so caches keyed on them keep working; the caller's objects are never modified."""
    if isinstance(obj, torch.Tensor):
        if obj.is_inference():
            with torch.inference_mode(False):
                return obj.clone()
        return obj
    if isinstance(obj, dict):
        out = {k: normal(v) for k, v in obj.items()}
        return obj if all(out[k] is v for k, v in obj.items()) else out
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        items = [normal(v) for v in obj]
        return obj if all(a is b for a, b in zip(items, obj)) else type(obj)(items)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changed = {f.name: normal(getattr(obj, f.name)) for f in dataclasses.fields(obj) if hasattr(obj, f.name)}
        changed = {k: v for k, v in changed.items() if v is not getattr(obj, k)}
        if not changed:
            return obj
        out = copy.copy(obj)
        for k, v in changed.items():
            object.__setattr__(out, k, v)
        return out
    return obj


def _materialize(module: torch.nn.Module) -> None:
    """Replace inference-mode parameters and buffers of ``module`` in place by normal copies (shared
    parameters stay shared). A no-op when there are none, e.g. outside ComfyUI."""
    if not any(t.is_inference() for t in module.parameters()) and \
            not any(t.is_inference() for t in module.buffers()):
        return
    done: dict[int, torch.Tensor] = {}
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    if id(p) not in done:
                        done[id(p)] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                    m._parameters[name] = done[id(p)]
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    if id(b) not in done:
                        done[id(b)] = b.clone()
                    m._buffers[name] = done[id(b)]


def autograd_node(method):
    """Decorator for a node method that optimises (backward passes): runs it inside autograd() with its
    tensor inputs made normal. Models it uses must be put on the device with load_to_device inside."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with autograd():
            return method(self, *[normal(a) for a in args], **{k: normal(v) for k, v in kwargs.items()})

    return run


def soft_empty_cache() -> None:
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


SD_UNET_DTYPES = [torch.float16, torch.bfloat16, torch.float32]  # what ComfyUI runs SD 1.x/2.x UNets in


def default_dtype(device: torch.device) -> torch.dtype:
    """``auto`` precision (pipelines/core/dtypes.py states the rule): ComfyUI's choice for an SD 1.x/2.x UNet
    on ``device`` (its ``--fp16-unet``/``--bf16-unet``/``--fp32-unet`` honoured); outside ComfyUI fp16 on
    CUDA, fp32 elsewhere."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        try:
            return mm.unet_dtype(device, supported_dtypes=SD_UNET_DTYPES)
        except Exception:
            pass
    return dtypes.default_dtype(device)


# ------------------------------------------------------------------------------------ model folders
def register_model_folders() -> None:
    """Register the pack's model folders (models/diffharmony, ...) with ComfyUI.

    ComfyUI reads extra_model_paths.yaml before it imports custom nodes, so a user's mapping of e.g.
    ``diffharmony:`` may already have created the folder name: the default folder is added in any case
    (add_model_folder_path ignores a path it already has)."""
    fp = _comfy("folder_paths")
    if fp is None:
        return
    for name in PACK_FOLDERS:
        fp.add_model_folder_path(name, os.path.join(fp.models_dir, name))


SAMPLES = ("harmonize_sample_cat.jpg", "harmonize_sample_cat_mask.png")  # samples/: what the workflows load


def install_samples(input_dir: str | os.PathLike | None = None) -> list[str]:
    """Copy the pack's sample composite and mask (samples/) into ComfyUI's input folder, so a shipped
    workflow runs as soon as it is opened. A file that is already there is never replaced (whatever it
    holds), and a failure (read-only folder, ...) is only reported: loading the pack goes on. Returns the
    names copied. Outside ComfyUI (no input folder given, no folder_paths) nothing happens."""
    if input_dir is None:
        fp = _comfy("folder_paths")
        if fp is None:
            return []
        input_dir = fp.get_input_directory()
    source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples")
    copied = []
    for name in SAMPLES:
        target = os.path.join(input_dir, name)
        try:
            with open(os.path.join(source, name), "rb") as f:
                data = f.read()
            os.makedirs(input_dir, exist_ok=True)
            if os.path.lexists(target):
                continue
            with open(target, "xb") as f:  # "x": fails if the file appeared meanwhile
                try:
                    f.write(data)
                except OSError:
                    f.close()
                    os.remove(target)  # only the file created here, never a user's
                    raise
            copied.append(name)
        except OSError as exc:
            logging.getLogger(__name__).warning("[ComfyUI-Harmonize] could not copy the sample %s into %s: %s",
                                                name, input_dir, exc)
    if copied:
        logging.getLogger(__name__).info("[ComfyUI-Harmonize] sample images for the shipped workflows copied "
                                         "into %s: %s", input_dir, ", ".join(copied))
    return copied


def model_roots(kind: str) -> list[str]:
    """Folders searched for models of ``kind`` (a ComfyUI folder name such as "diffharmony")."""
    fp = _comfy("folder_paths")
    if fp is not None:
        try:
            return [p for p in fp.get_folder_paths(kind) if p]
        except Exception:
            return [os.path.join(fp.models_dir, kind)]
    root = os.environ.get(MODELS_ENV) or os.path.join(os.getcwd(), "models")
    return [os.path.join(root, kind)]


def comfy_package_dirs() -> list[str]:
    """The folders of ComfyUI's ``comfy`` package. In a real ComfyUI checkout ``comfy`` is a namespace
    package (no ``__init__.py``: ``comfy.__file__`` is None), so its location is read from ``comfy.__path__``
    and, as a second witness, from a module inside it."""
    dirs: list[str] = []
    comfy = _comfy("comfy")
    if comfy is not None:
        if getattr(comfy, "__file__", None):
            dirs.append(os.path.dirname(comfy.__file__))
        dirs += [str(p) for p in getattr(comfy, "__path__", [])]
        sd1_clip = _comfy("comfy.sd1_clip")
        if sd1_clip is not None and getattr(sd1_clip, "__file__", None):
            dirs.append(os.path.dirname(sd1_clip.__file__))
    return list(dict.fromkeys(os.path.realpath(d) for d in dirs))


def comfy_tokenizer_dir() -> str | None:
    """ComfyUI's bundled CLIP BPE tokenizer (comfy/sd1_tokenizer, used by ComfyUI for SD 1.x and 2.x),
    when ComfyUI is importable."""
    paths = [os.path.join(folder, "sd1_tokenizer") for folder in comfy_package_dirs()]
    for path in paths:
        if os.path.isfile(os.path.join(path, "vocab.json")):
            return path
    return paths[0] if paths else None  # searched (and named in a missing-tokenizer error) though empty


# ------------------------------------------------------------------------------------ output folder
OUTPUT_ENV = "HARMONIZE_OUTPUT_DIR"  # output folder used when ComfyUI is not importable (tests, CLI)


def output_directory() -> str:
    """ComfyUI's output folder (``--output-directory`` honoured); outside ComfyUI ``$HARMONIZE_OUTPUT_DIR``
    or ``./output``."""
    fp = _comfy("folder_paths")
    if fp is not None:
        try:
            return fp.get_output_directory()
        except Exception:
            pass
    return os.environ.get(OUTPUT_ENV) or os.path.join(os.getcwd(), "output")


# --------------------------------------------------------------------------- model choices for loader nodes
DTYPES = dtypes.DTYPES  # the dtype widget's choices


def dtype_for(name: str) -> torch.dtype:
    """A loader's dtype widget, by the pack's one rule (pipelines/core/dtypes.py) with ComfyUI's ``auto``."""
    return dtypes.resolve_dtype(name, torch_device(), auto=default_dtype)


def sd_model_choices(folders: tuple[str, ...]) -> dict:
    """Stable Diffusion models in ComfyUI's ``folders``: diffusers folders and DiffHarmony archives
    everywhere, named ``<folder>/<name>``; single-file checkpoints only in ``checkpoints``, named by their
    path inside it as ComfyUI's own checkpoint loader names them (so a workflow's ``properties.models``
    entry, whose name must equal the widget's value, can point the front end at the missing file)."""
    choices = {}
    for folder in folders:
        for name, path in find_models(model_roots(folder), files=folder == "checkpoints").items():
            bare = folder == "checkpoints" and os.path.isfile(path)
            choices[name if bare and name not in choices else f"{folder}/{name}"] = path
    return choices


EXPECTED = {  # what a loader's "not found" error says belongs in the folders it searched
    "model": "a diffusers pipeline folder, the DiffHarmony archive as downloaded (base/ + refinement/) or, in "
             "checkpoints, a single-file .safetensors checkpoint",
    "refiner": "the DiffHarmony archive's refinement/ folder (config.json + weights)",
    "condition VAE": "the DiffHarmony archive's condition_vae/ folder (config.json + weights)",
    "inverse model": "the DiffHarmony archive as downloaded, holding inverse/",
}


def resolve_choice(choice: str, choices: dict, what: str, folders: tuple[str, ...]):
    """The path behind a loader's combo value, or the pack's "not found" error naming the folders searched."""
    roots = [r for f in folders for r in model_roots(f)]
    return model_files.resolve(choice, choices, what, roots, EXPECTED.get(what, f"a {what} in those folders"))
