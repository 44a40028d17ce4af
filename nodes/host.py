"""The one place that talks to ComfyUI. Every import of ComfyUI is lazy and has a plain-torch fallback,
so every node also runs (and is tested) without ComfyUI installed."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import os

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


_WHOLE_MODULE_PATCHERS: dict = {}  # ComfyUI's ModelPatcher class -> our subclass of it


def whole_module_patcher_class():
    """ComfyUI's ModelPatcher for a plain torch module (diffusers, transformers, the pack's own networks).

    ComfyUI can load a model partially (little free VRAM, ``--lowvram``/``--novram``, another model already
    resident) and unload one partially to make room; that is safe only for layers built from ComfyUI's own
    ops, which cast their weights to the compute device at each forward. A plain module left half on each
    device fails at its next forward with a device mismatch. This patcher makes such a module all or
    nothing: every load is a full load, and a partial unload frees nothing, so ComfyUI unloads the module
    entirely instead. None outside ComfyUI."""
    mp = _comfy("comfy.model_patcher")
    if mp is None:
        return None
    if not isinstance(mp.ModelPatcher, type):  # a stand-in factory (tests): nothing to specialise
        return mp.ModelPatcher
    if mp.ModelPatcher in _WHOLE_MODULE_PATCHERS:
        return _WHOLE_MODULE_PATCHERS[mp.ModelPatcher]

    class WholeModulePatcher(mp.ModelPatcher):
        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
            return super().load(device_to, lowvram_model_memory=0, force_patch_weights=force_patch_weights,
                                full_load=True)

        def partially_unload(self, device_to, memory_to_free=0):
            return 0  # nothing freed: ComfyUI then detaches the whole module (model_unload)

    _WHOLE_MODULE_PATCHERS[mp.ModelPatcher] = WholeModulePatcher
    return WholeModulePatcher


def patcher_for(module: torch.nn.Module):
    """The one WholeModulePatcher of ``module`` (made on first use and kept on the module), or None outside
    ComfyUI. It manages a holder around the module: ModelPatcher sets ``.device`` on the model it manages,
    which diffusers and transformers models expose as a read-only property."""
    cls = whole_module_patcher_class()
    if cls is None:
        return None
    patcher = module.__dict__.get("_harmonize_patcher")
    if patcher is None:
        holder = torch.nn.ModuleDict({"module": module})
        patcher = cls(holder, load_device=torch_device(), offload_device=offload_device())
        object.__setattr__(module, "_harmonize_patcher", patcher)
    return patcher


def load_models(*modules: torch.nn.Module) -> torch.device:
    """Put ``modules`` on the compute device for one run. In ComfyUI each is a model of its own in model
    management (one patcher each, so each is accounted and evicted alone) and they are loaded in ONE call,
    so loading one cannot evict another the same run needs; each is loaded fully (see
    whole_module_patcher_class). Outside ComfyUI they are simply moved. Returns the device to compute on."""
    device = torch_device()
    mm = _comfy("comfy.model_management")
    patchers = [patcher_for(m) for m in modules]
    if mm is not None and all(p is not None for p in patchers):
        mm.load_models_gpu(patchers, force_full_load=True)
    else:
        for m in modules:
            m.to(device)
    if not torch.is_inference_mode_enabled():  # inside autograd(): weights must be able to take part
        for m in modules:
            _materialize(m)
    return device


def load_to_device(module: torch.nn.Module) -> torch.device:
    """load_models for one module."""
    return load_models(module)


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


# ------------------------------------------------------------------ ComfyUI's own MODEL / CLIP / VAE objects
class NeedsComfyUI(RuntimeError):
    """A node that works on ComfyUI's MODEL/CLIP/VAE objects was run outside ComfyUI."""


def require_comfy(what: str):
    """Import the ComfyUI modules the native path uses, or say clearly that ``what`` needs ComfyUI."""
    names = ("comfy.sd", "comfy.utils", "comfy.model_detection", "comfy.supported_models", "comfy.model_management",
             "comfy.model_patcher", "comfy.sd1_clip", "node_helpers")
    mods = {n: _comfy(n) for n in names}
    missing = [n for n, m in mods.items() if m is None]
    if missing:
        raise NeedsComfyUI(f"{what} works on ComfyUI's own MODEL/CLIP/VAE objects and needs ComfyUI "
                           f"(could not import {', '.join(missing)}); outside ComfyUI use the pack's "
                           f"DiffHarmony nodes (HARMONIZE_DIFFHARMONY_MODEL).")
    return mods


def _embedding_dirs() -> list[str]:
    fp = _comfy("folder_paths")
    try:
        return fp.get_folder_paths("embeddings") if fp is not None else []
    except Exception:
        return []


def comfy_unet_from_diffusers(state_dict: dict, config: dict, weight_dtype: torch.dtype | None = None):
    """A ComfyUI MODEL (ModelPatcher around ComfyUI's own UNet) from a diffusers UNet2DConditionModel state
    dict and its config, whatever its width: the keys are mapped with ComfyUI's own table
    (``comfy.utils.unet_to_diffusers``), the layout read back with ComfyUI's detection, the model class is the
    published one ComfyUI recognises (SD 1.5, SD 2, their inpainting forms) or, for other widths, SD 1.x/2.x
    chosen by the cross-attention width. The rest is what ``comfy.sd.load_diffusion_model_state_dict`` does
    (dtype choice, manual cast, fp8 weight dtypes)."""
    from ..pipelines.sd.comfy_layout import unet_key_layout

    c = require_comfy("Loading a UNet as a ComfyUI MODEL")
    utils, detection, supported = c["comfy.utils"], c["comfy.model_detection"], c["comfy.supported_models"]
    mm, mp = c["comfy.model_management"], c["comfy.model_patcher"]
    mapping = utils.unet_to_diffusers(unet_key_layout(config))  # diffusers key -> LDM key
    unmapped = [k for k in state_dict if k not in mapping]  # (the table also lists optional keys)
    if unmapped:
        from ..pipelines.core.errors import WeightsError

        raise WeightsError(f"the UNet weights do not match its config.json: {len(unmapped)} keys have no place "
                           f"in that layout, e.g. {unmapped[:3]}")
    ldm = {mapping[k]: v for k, v in state_dict.items() if k in mapping}
    unet_config = detection.detect_unet_config(ldm, "")
    model_config = next((m(unet_config) for m in supported.models if m.matches(unet_config, ldm)), None)
    if model_config is None:  # not a published size: SD 1.x or 2.x layout by the text width
        cls = supported.SD20 if unet_config.get("context_dim") == 1024 else supported.SD15
        model_config = cls(unet_config)
        heads = config.get("num_attention_heads") or config.get("attention_head_dim")
        if isinstance(heads, int):  # diffusers' SD configs give the head COUNT under attention_head_dim
            model_config.unet_config.update(num_heads=heads, num_head_channels=-1)
    load_device, offload = mm.get_torch_device(), mm.unet_offload_device()
    if weight_dtype is None:
        weight_dtype = mm.unet_dtype(model_params=utils.calculate_parameters(ldm),
                                     supported_dtypes=list(model_config.supported_inference_dtypes),
                                     weight_dtype=utils.weight_dtype(ldm))
    manual_cast = mm.unet_manual_cast(weight_dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(weight_dtype, manual_cast)
    model = model_config.get_model(ldm, "").to(offload)
    model.load_model_weights(ldm, "")
    return mp.ModelPatcher(model, load_device=load_device, offload_device=offload)


def comfy_vae_from_diffusers(state_dict: dict, config: dict):
    """A ComfyUI VAE from a diffusers AutoencoderKL state dict + config (ComfyUI converts the keys; the
    layout is given explicitly so widths other than SD's 128 load too)."""
    from ..pipelines.sd.comfy_layout import vae_ddconfig

    c = require_comfy("Loading a VAE as a ComfyUI VAE")
    return c["comfy.sd"].VAE(sd=dict(state_dict), config={"params": vae_ddconfig(config)})


def _text_model_keys(state_dict: dict) -> dict:
    """Keys as ComfyUI's CLIP text model names them (``text_model.*``): transformers 5 saves a
    CLIPTextModel without that prefix, older files (and published checkpoints) with it."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
            for k, v in state_dict.items()}


def comfy_clip_from_diffusers(state_dict: dict, config: dict, tokenizer_dir: str,
                              dtype: torch.dtype | None = None):
    """A ComfyUI CLIP for an SD 1.x-style CLIP text encoder of any size (transformers CLIPTextModel state
    dict + config) with the tokenizer files of ``tokenizer_dir``: ComfyUI's SD1 CLIP classes, told the
    text tower's config and special tokens. Published SD 1.x/2.x text encoders go through
    ``comfy.sd.load_clip`` instead (see native_sd)."""
    import functools

    from ..pipelines.sd.comfy_layout import clip_text_config
    from ..pipelines.sd.loading import tokenizer_layout

    c = require_comfy("Loading a text encoder as a ComfyUI CLIP")
    sd1 = c["comfy.sd1_clip"]
    text_config = clip_text_config(config)
    tokens = {"start": text_config["bos_token_id"], "end": text_config["eos_token_id"],
              "pad": text_config["pad_token_id"]}
    tok_args = {}
    if tokenizer_layout(tokenizer_dir) == "json":
        from transformers import CLIPTokenizerFast

        tok_args["tokenizer_class"] = CLIPTokenizerFast

    class Target:
        params: dict = {}
        clip = functools.partial(sd1.SD1ClipModel, clip_model=functools.partial(
            sd1.SDClipModel, textmodel_json_config=text_config, special_tokens=tokens))
        tokenizer = functools.partial(sd1.SD1Tokenizer, tokenizer=functools.partial(
            sd1.SDTokenizer, tokenizer_path=str(tokenizer_dir), embedding_size=text_config["hidden_size"],
            **tok_args))

    clip = c["comfy.sd"].CLIP(Target, embedding_directory=_embedding_dirs(),
                              model_options={"dtype": dtype} if dtype is not None else {})
    weights = _text_model_keys(state_dict)
    key = "text_model.embeddings.token_embedding.weight"
    rows = clip.cond_stage_model.clip_l.transformer.text_model.embeddings.token_embedding.weight.shape[0]
    if key in weights and weights[key].shape[0] < rows:  # ComfyUI's CLIP has CLIP's 49408-token table;
        emb = weights[key]                                # a smaller vocabulary fills its first rows
        weights[key] = torch.cat([emb, emb.new_zeros(rows - emb.shape[0], emb.shape[1])])
    missing, _ = clip.load_sd(weights)
    missing = [k for k in missing if k != "text_projection.weight"]  # SD uses the hidden states, not the projection
    if missing:
        from ..pipelines.core.errors import WeightsError

        raise WeightsError(f"the text encoder weights do not fit its config.json: {len(missing)} missing, "
                           f"e.g. {missing[:3]}")
    return clip


PUBLISHED_TEXT_ENCODERS = {(768, 12), (1024, 23), (1024, 24)}  # SD 1.x CLIP-L; SD 2.x OpenCLIP-H (transformers)


def _component(folder, sub: str, stems: tuple[str, ...]):
    """(state dict, config) of a diffusers component folder: .safetensors preferred over .bin, plain over
    the ``fp16`` variant; loaded without executing pickles."""
    import json
    from pathlib import Path

    from ..pipelines.core.errors import WeightsError
    from ..pipelines.core.weights import load_state_dict

    d = Path(folder) / sub
    names = [f"{s}{v}.{e}" for e in ("safetensors", "bin") for v in ("", ".fp16") for s in stems]
    path = next((d / n for n in names if (d / n).is_file()), None)
    if path is None or not (d / "config.json").is_file():
        raise WeightsError(f"{d}: expected config.json and one of {', '.join(names)}")
    return load_state_dict(path), json.loads((d / "config.json").read_text())


def native_sd(path, weight_dtype: torch.dtype | None = None, text_dtype: torch.dtype | None = None):
    """(MODEL, CLIP, VAE) as ComfyUI's own objects, one ModelPatcher each, from the DiffHarmony archive
    (``base/``), a diffusers folder, or a single-file checkpoint.

    A single-file checkpoint of a published architecture is loaded by ``comfy.sd.load_checkpoint_guess_config``
    (what CheckpointLoaderSimple does); folders and other sizes through comfy_unet_from_diffusers /
    comfy_vae_from_diffusers / comfy_clip_from_diffusers (published SD text encoders by
    ``comfy.sd.load_text_encoder_state_dicts`` with ComfyUI's own tokenizer). ``weight_dtype`` / ``text_dtype``:
    the UNet's / text encoder's weight dtype, None = ComfyUI's choice for the device."""
    from pathlib import Path

    from ..pipelines.sd import loading, models

    c = require_comfy("The native DiffHarmony loader")
    path = Path(path)
    if path.is_file():
        try:
            out = c["comfy.sd"].load_checkpoint_guess_config(
                str(path), output_vae=True, output_clip=True, embedding_directory=_embedding_dirs(),
                model_options={"dtype": weight_dtype} if weight_dtype is not None else {},
                te_model_options={"dtype": text_dtype} if text_dtype is not None else {})
            if out[0] is not None and out[1] is not None and out[2] is not None:
                return out[0], out[1], out[2]
        except RuntimeError:  # an architecture ComfyUI does not detect (other widths): the pack's configs
            pass
        sd = models.load_sd(path, tokenizer_dir=comfy_tokenizer_dir())
        parts = {n: (m.state_dict(), dict(m.config if isinstance(m.config, dict) else m.config.to_dict()))
                 for n, m in sd.modules().items()}
        tokenizer_dir = getattr(sd.tokenizer, "name_or_path", None)
        del sd
    else:
        folder = loading.resolve_pipeline_folder(path)
        parts = {"unet": _component(folder, "unet", ("diffusion_pytorch_model",)),
                 "vae": _component(folder, "vae", ("diffusion_pytorch_model",)),
                 "text_encoder": _component(folder, "text_encoder", ("model", "pytorch_model"))}
        own = folder / "tokenizer"
        tokenizer_dir = str(own) if loading.tokenizer_layout(own) else comfy_tokenizer_dir()
        loading.load_tokenizer([own, tokenizer_dir])  # a missing tokenizer: the error names every folder
    model = comfy_unet_from_diffusers(*parts["unet"], weight_dtype=weight_dtype)
    vae = comfy_vae_from_diffusers(*parts["vae"])
    te_sd, te_cfg = parts["text_encoder"]
    if (te_cfg.get("hidden_size"), te_cfg.get("num_hidden_layers")) in PUBLISHED_TEXT_ENCODERS:
        clip = c["comfy.sd"].load_text_encoder_state_dicts(
            [_text_model_keys(te_sd)], embedding_directory=_embedding_dirs(),
            model_options={"dtype": text_dtype} if text_dtype is not None else {})
    else:
        clip = comfy_clip_from_diffusers(te_sd, te_cfg, tokenizer_dir, text_dtype)
    return model, clip, vae


def model_channels(model) -> tuple[int | None, int]:
    """(UNet input channels, latent channels) of a ComfyUI MODEL."""
    base = model.model
    unet_config = getattr(getattr(base, "model_config", None), "unet_config", {}) or {}
    in_channels = unet_config.get("in_channels")
    if in_channels is None:
        conv = getattr(base.diffusion_model, "input_blocks", None)
        in_channels = conv[0][0].weight.shape[1] if conv is not None else None
    return in_channels, int(base.latent_format.latent_channels)


def vae_latent_channels(vae) -> int:
    return int(vae.latent_channels)


def vae_encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """ComfyUI's VAE encode (what VAEEncode does): IMAGE ``[B,H,W,3]`` -> UNSCALED latents (the mean)."""
    return vae.encode(pixels[:, :, :, :3])


def encode_prompt(clip, text: str):
    """ComfyUI's CLIP text encode (what CLIPTextEncode does) -> CONDITIONING."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def set_conditioning(conditioning, values: dict):
    """A copy of CONDITIONING with ``values`` set on every entry (ComfyUI's node_helpers; outside ComfyUI
    the same copy by hand). The caller's conditioning is not modified."""
    helpers = _comfy("node_helpers")
    if helpers is not None and hasattr(helpers, "conditioning_set_values"):
        return helpers.conditioning_set_values(conditioning, values)
    return [[t, {**d, **values}] for t, d in conditioning]
