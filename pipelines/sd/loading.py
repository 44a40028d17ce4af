"""Loading Stable Diffusion components offline, from what users actually have.

- a diffusers pipeline folder (model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/);
- the DiffHarmony archive as its authors publish it (``base/`` is such a folder, its unet/vae weights as
  pickled ``.bin``; ``refinement/`` holds the refinement UNet);
- a single-file ``.safetensors`` checkpoint: single_file.py (configs ship with the pack); models.py loads
  and lists either.

diffusers/transformers read ``.bin`` files with ``torch.load(weights_only=True)``; nothing is fetched and no
pickle is executed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

# diffusers and transformers are imported where first used: importing them adds seconds to ComfyUI's start-up
# (which imports every node module), while a graph that never loads this model does not need them.
from ..core.errors import WeightsError
from ..core.weights import UNSAFE, load_error, own_memory

TOKENIZER_FILES = ("vocab.json", "merges.txt")
TOKENIZER_JSON = "tokenizer.json"


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion pipeline the pack uses. Weights live on the CPU until a run."""

    unet: "torch.nn.Module"
    vae: "torch.nn.Module"
    text_encoder: "torch.nn.Module"
    tokenizer: object
    scheduler_config: dict
    source: str
    dtype: torch.dtype = torch.float32
    cache: dict = field(default_factory=dict, repr=False)  # e.g. cached prompt embeddings

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def modules(self):
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def diffharmony_base(path: str | os.PathLike) -> Path | None:
    """The ``base/`` pipeline folder when ``path`` is the DiffHarmony archive root."""
    base = Path(path) / "base"
    return base if is_diffusers_folder(base) else None


def resolve_pipeline_folder(path: str | os.PathLike) -> Path:
    path = Path(path)
    if is_diffusers_folder(path):
        return path
    base = diffharmony_base(path)
    if base is not None:
        return base
    raise WeightsError(
        f"{path} is not a diffusers pipeline folder (no model_index.json) nor a DiffHarmony archive "
        f"(no base/model_index.json). Expected the unpacked DiffHarmony download, a diffusers folder or a "
        f".safetensors checkpoint file."
    )


def tokenizer_layout(folder: str | os.PathLike | None) -> str | None:
    """"bpe" when ``folder`` holds vocab.json + merges.txt (the slow CLIP tokenizer's files), "json" when it
    holds only ``tokenizer.json`` (what current transformers save), else None."""
    if not folder or not os.path.isdir(folder):
        return None
    if all(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        return "bpe"
    if os.path.isfile(os.path.join(folder, TOKENIZER_JSON)):
        return "json"
    return None


def load_tokenizer(candidates: list[str | os.PathLike | None]):
    """The CLIP tokenizer of the first folder that has one: vocab.json + merges.txt (``CLIPTokenizer``) or a
    ``tokenizer.json`` alone (``CLIPTokenizerFast``; both give the same ids). A miss names every folder
    searched."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    tried = []
    for folder in candidates:
        if not folder:
            continue
        tried.append(str(folder))
        layout = tokenizer_layout(folder)
        if layout is None:
            continue
        cls = CLIPTokenizer if layout == "bpe" else CLIPTokenizerFast
        try:
            return cls.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise WeightsError(f"could not read the CLIP tokenizer in {folder}: {exc}") from exc
    raise WeightsError(
        "no CLIP tokenizer found: looked for vocab.json + merges.txt or tokenizer.json in "
        + (", ".join(tried) or "no folder")
        + ". Put the tokenizer files in the model's tokenizer/ folder, or run inside ComfyUI (which ships them "
        "in comfy/sd1_tokenizer), or pass the folder explicitly."
    )


def weights_variant(folder: str | os.PathLike, stems: tuple[str, ...]) -> str | None:
    """``"fp16"`` when ``folder`` holds only ``<stem>.fp16.<ext>`` weights (diffusers/transformers then need
    ``variant="fp16"``), else None. Where plain files exist they are used; diffusers and transformers
    prefer ``.safetensors`` over ``.bin`` when both are there."""
    folder = Path(folder)
    plain = [folder / f"{stem}.{ext}" for stem in stems for ext in ("safetensors", "bin")]
    fp16 = [folder / f"{stem}.fp16.{ext}" for stem in stems for ext in ("safetensors", "bin")]
    if not any(p.is_file() for p in plain) and any(p.is_file() for p in fp16):
        return "fp16"
    return None


WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def load_component(cls, folder: Path, subfolder: str, dtype: torch.dtype):
    """``cls.from_pretrained(folder/subfolder)`` offline (safetensors, or .bin read without unpickling
    objects), with one clear WeightsError per kind of failure."""
    sub = folder / subfolder
    if not (sub / "config.json").is_file():
        raise WeightsError(f"{sub}/config.json is missing: expected a {cls.__name__} in {sub}")
    try:
        kwargs = {"variant": variant} if (variant := weights_variant(sub, WEIGHT_STEMS)) else {}
        return cls.from_pretrained(str(sub), torch_dtype=dtype, local_files_only=True, **kwargs)
    except Exception as exc:  # one message per kind of failure, naming the folder and the model
        err = load_error(exc, sub, str(folder))
        raise err from (None if err.args[0].startswith(UNSAFE) else exc)


def load_diffusers_folder(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                          tokenizer_dir: str | os.PathLike | None = None,
                          unet_folder: str | os.PathLike | None = None) -> SDComponents:
    """Load unet/vae/text_encoder/tokenizer/scheduler config from a diffusers pipeline folder (or the
    DiffHarmony archive root, whose ``base/`` is one). ``unet_folder``: a UNet folder of its own to use
    instead of the pipeline's ``unet/`` (which is then not read); the result's source names it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = resolve_pipeline_folder(path)
    if unet_folder is None:
        unet = load_component(UNet2DConditionModel, folder, "unet", dtype)
    else:
        unet_folder = Path(unet_folder)
        unet = load_component(UNet2DConditionModel, unet_folder.parent, unet_folder.name, dtype)
    vae = load_component(AutoencoderKL, folder, "vae", dtype)
    text_encoder = load_component(CLIPTextModel, folder, "text_encoder", dtype)
    tokenizer = load_tokenizer([folder / "tokenizer", tokenizer_dir])
    sched_file = folder / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise WeightsError(f"{sched_file} is missing: expected the scheduler config of the pipeline")
    try:
        scheduler_config = json.loads(sched_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise load_error(exc, sched_file, str(folder)) from None
    if not isinstance(scheduler_config, dict):
        raise WeightsError(f"{sched_file} (model {folder}) holds no scheduler config (a JSON object expected)")
    for m in (unet, vae, text_encoder):
        own_memory(m).eval().requires_grad_(False)
    return SDComponents(unet, vae, text_encoder, tokenizer, scheduler_config, str(unet_folder or folder), dtype)
