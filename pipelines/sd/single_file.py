"""Single-file Stable Diffusion checkpoints (the original LDM/CompVis layout), loaded offline.

A single-file checkpoint is one state dict holding the whole pipeline under the original key prefixes:

- ``model.diffusion_model.*``           the UNet
- ``first_stage_model.*``               the VAE
- ``cond_stage_model.transformer.*``    the text encoder of SD 1.x (CLIP ViT-L/14, transformers layout)
- ``cond_stage_model.model.*``          the text encoder of SD 2.x (OpenCLIP ViT-H/14, open_clip layout)

The family (SD 1.x / SD 2.x) is read from the text-encoder keys and the UNet's ``in_channels`` from the
shape of ``conv_in`` (4 text-to-image, 9 inpainting). The diffusers models are built from configs that
ship in the pack (``pipelines/sd/configs/sd15`` and ``pipelines/sd/configs/sd2``: Stable Diffusion 1.5 and
Stable Diffusion 2-base) and the keys are converted with diffusers' own converters
(``diffusers.loaders.single_file_utils``). Nothing is downloaded: no hub is ever contacted.

Other architectures (or tiny test models) use a config folder in the diffusers layout::

    unet/config.json  vae/config.json  text_encoder/config.json  scheduler/scheduler_config.json
    tokenizer/        (optional: vocab.json + merges.txt, or tokenizer.json [+ tokenizer_config.json])

passed as ``config_dir``, or placed next to the checkpoint as a *sidecar* folder named after the file
without its extension plus ``.config``::

    models/checkpoints/my_model.safetensors
    models/checkpoints/my_model.config/unet/config.json ...

The sidecar is used automatically, so such models load through the same nodes. Each config file present
replaces the shipped one; missing files fall back to the shipped config of the detected family. The UNet's
``in_channels`` is always taken from the checkpoint.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch

# diffusers and transformers are imported where first used: importing them adds seconds to ComfyUI's start-up
# (which imports every node module), while a graph that never loads this model does not need them.
from ..core.errors import WeightsError
from .loading import SDComponents, load_tokenizer, tokenizer_layout
from ..core.weights import empty_weights, load_into, load_state_dict

CONFIGS = Path(__file__).resolve().parent / "configs"
SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: transformers CLIPTextModel
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: open_clip text tower
CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"

# family -> (shipped config folder, text-encoder key prefix, description)
FAMILIES = {
    "sd1": ("sd15", CLIP_PREFIX, "Stable Diffusion 1.x (CLIP ViT-L/14 text encoder)"),
    "sd2": ("sd2", OPEN_CLIP_PREFIX, "Stable Diffusion 2.x (OpenCLIP ViT-H/14 text encoder)"),
}

# component -> (file in a diffusers-layout config folder, file in pipelines/sd/configs/<family>/)
CONFIG_FILES = {
    "unet": ("unet/config.json", "unet.json"),
    "vae": ("vae/config.json", "vae.json"),
    "text_encoder": ("text_encoder/config.json", "text_encoder.json"),
    "scheduler": ("scheduler/scheduler_config.json", "scheduler.json"),
}


def sidecar_config_dir(path: str | os.PathLike) -> Path:
    """Where the optional config folder of a checkpoint lives: ``<name without extension>.config``."""
    path = Path(path)
    return path.with_name(path.stem + ".config")


def key_families(keys) -> dict[str, int]:
    """Count keys by their leading components (``model.diffusion_model``, ``first_stage_model``,
    ``cond_stage_model.model``, ``down_blocks`` ...), to say what a file holds."""
    counts: Counter = Counter()
    for key in keys:
        parts = str(key).split(".")
        depth = 2 if parts[0] in ("model", "cond_stage_model", "conditioner", "model_ema") and len(parts) > 2 else 1
        counts[".".join(parts[:depth])] += 1
    return dict(counts.most_common())


def _describe(keys) -> str:
    fam = key_families(keys)
    if not fam:
        return "no tensors at all"
    shown = ", ".join(f"{name}.* ({n})" for name, n in list(fam.items())[:8])
    more = f" and {len(fam) - 8} more" if len(fam) > 8 else ""
    return f"key families {shown}{more}"


def detect_family(state_dict: dict, source: str = "checkpoint") -> tuple[str, int]:
    """``(family, unet_in_channels)`` of a single-file checkpoint; WeightsError when it is not a complete
    SD 1.x / SD 2.x checkpoint in the original layout."""
    keys = list(state_dict)
    has = {name: any(k.startswith(prefix) for k in keys)
           for name, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("clip", CLIP_PREFIX),
                                ("open_clip", OPEN_CLIP_PREFIX), ("sdxl", "conditioner.embedders."))}
    if has["sdxl"]:
        raise WeightsError(
            f"{source} is an SDXL checkpoint (conditioner.embedders.* keys); only Stable Diffusion 1.x and 2.x "
            f"single files are supported. Found {_describe(keys)}."
        )
    if not has["unet"] or CONV_IN not in state_dict:
        hint = ""
        if any(k.startswith(("down_blocks.", "conv_in.", "encoder.", "text_model.")) for k in keys):
            hint = (" It looks like one component saved in the diffusers layout: load the whole diffusers "
                    "pipeline folder instead.")
        elif any("lora" in k.lower() for k in keys[:200]):
            hint = " It looks like a LoRA, which needs a base model."
        raise WeightsError(
            f"{source} is not a Stable Diffusion checkpoint: expected the original single-file layout with "
            f"{UNET_PREFIX}* (UNet, including {CONV_IN}), {VAE_PREFIX}* (VAE) and {CLIP_PREFIX}* (SD 1.x) or "
            f"{OPEN_CLIP_PREFIX}* (SD 2.x) keys, but found {_describe(keys)}.{hint}"
        )
    if has["clip"] == has["open_clip"]:
        what = "both" if has["clip"] else "neither"
        raise WeightsError(
            f"{source}: unknown Stable Diffusion family: it has {what} of the SD 1.x text encoder "
            f"({CLIP_PREFIX}*) and the SD 2.x text encoder ({OPEN_CLIP_PREFIX}*); found {_describe(keys)}. "
            f"UNet-only files are not supported: use a full checkpoint."
        )
    if not has["vae"]:
        raise WeightsError(
            f"{source} has no VAE ({VAE_PREFIX}* keys); found {_describe(keys)}. Use a full checkpoint that "
            f"includes its VAE."
        )
    conv_in = state_dict[CONV_IN]
    if conv_in.ndim != 4:
        raise WeightsError(f"{source}: {CONV_IN} has shape {tuple(conv_in.shape)}; expected a 4-d conv weight")
    return ("sd1" if has["clip"] else "sd2"), int(conv_in.shape[1])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"could not read the config {path}: {exc}") from exc


def resolve_config_dir(path: str | os.PathLike, config_dir: str | os.PathLike | None) -> Path | None:
    """The explicit ``config_dir``, else the checkpoint's sidecar ``<stem>.config`` folder when present."""
    if config_dir is not None:
        config_dir = Path(config_dir)
        if not config_dir.is_dir():
            raise WeightsError(f"config folder not found: {config_dir}")
        return config_dir
    sidecar = sidecar_config_dir(path)
    return sidecar if sidecar.is_dir() else None


def read_configs(family: str, config_dir: str | os.PathLike | None = None) -> dict[str, dict]:
    """Configs of unet / vae / text_encoder / scheduler / tokenizer: those in ``config_dir`` (diffusers
    layout) where present, otherwise the ones shipped for ``family``."""
    if family not in FAMILIES:
        raise WeightsError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    shipped = CONFIGS / FAMILIES[family][0]
    configs, used = {}, []
    for name, (override, own) in CONFIG_FILES.items():
        candidate = Path(config_dir) / override if config_dir is not None else None
        if candidate is not None and candidate.is_file():
            configs[name] = _read_json(candidate)
            used.append(override)
        else:
            configs[name] = _read_json(shipped / own)
    if config_dir is not None and not used and not _has_tokenizer(Path(config_dir) / "tokenizer"):
        raise WeightsError(
            f"config folder {config_dir} holds none of " + ", ".join(o for o, _ in CONFIG_FILES.values())
            + " nor tokenizer/: expected a config folder in the diffusers layout"
        )
    configs["tokenizer"] = _read_json(shipped / "tokenizer_config.json")
    return configs


def _has_tokenizer(folder: Path) -> bool:
    return tokenizer_layout(folder) is not None


def _build_tokenizer(family: str, configs: dict, config_dir: Path | None, tokenizer_dir):
    """The model's own tokenizer/ from the config folder as it is; otherwise the CLIP BPE files from
    ``tokenizer_dir`` with the family's special-token settings (SD 2.x pads with "!", id 0; SD 1.x with
    <|endoftext|>; both 77 tokens)."""
    own = config_dir / "tokenizer" if config_dir is not None else None
    tokenizer = load_tokenizer([own, tokenizer_dir])
    if own is not None and _has_tokenizer(own):
        return tokenizer
    cfg = configs["tokenizer"]
    if cfg["pad_token"] not in tokenizer.get_vocab():
        raise WeightsError(
            f"the CLIP tokenizer in {tokenizer_dir} has no {cfg['pad_token']!r} token, which "
            f"{FAMILIES[family][2]} pads with; expected the CLIP BPE vocabulary"
        )
    tokenizer.pad_token = cfg["pad_token"]
    tokenizer.model_max_length = int(cfg["model_max_length"])
    return tokenizer


def _cast(state_dict: dict, dtype: torch.dtype) -> dict:
    """Fresh contiguous copies in ``dtype``. The tensors safetensors returns are views into one file-sized
    buffer, often not 64-byte aligned: assigned as parameters they would keep the whole file alive and make
    CPU kernels take other vectorised paths (results differing in the last bits from the same weights
    loaded by diffusers)."""
    return {k: v.to(dtype=dtype if v.is_floating_point() else v.dtype, memory_format=torch.contiguous_format,
                    copy=True)
            for k, v in state_dict.items()}


def _text_encoder_state(family: str, model, checkpoint: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if family == "sd1":
        converted = convert_ldm_clip_checkpoint(checkpoint)
    else:
        prefix = OPEN_CLIP_PREFIX
        converted = convert_open_clip_checkpoint(model, checkpoint, prefix=prefix)
        # SD 2.x conditions on the penultimate layer of the OpenCLIP transformer: the diffusers text encoder
        # has one layer fewer than the checkpoint. diffusers drops that last block for ViT-H (block 23);
        # drop it here for any depth.
        n_layers = model.config.num_hidden_layers
        blocks = {k[len(prefix + "transformer.resblocks."):].split(".")[0]
                  for k in checkpoint if k.startswith(prefix + "transformer.resblocks.")}
        if len(blocks) == n_layers + 1:
            converted = {k: v for k, v in converted.items()
                         if not k.startswith(f"text_model.encoder.layers.{n_layers}.")}
        converted.pop("text_projection.weight", None)  # only CLIPTextModelWithProjection has it
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    own = model.state_dict()
    # position_ids is a buffer that older transformers saved into SD 1.x checkpoints; it is not a weight
    return {k: v for k, v in converted.items() if k in own or not k.endswith("position_ids")}


def load_single_file(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                     tokenizer_dir: str | os.PathLike | None = None,
                     config_dir: str | os.PathLike | None = None,
                     prediction_type: str | None = None) -> SDComponents:
    """Load a single-file SD 1.x / SD 2.x checkpoint (``.safetensors``, or a tensor-only ``.ckpt``/``.pt``
    read with ``weights_only=True``) into diffusers/transformers models, offline.

    ``tokenizer_dir``: folder with the CLIP BPE files (vocab.json, merges.txt), e.g. ComfyUI's
    ``comfy/sd1_tokenizer``; a ``tokenizer/`` in the config folder takes precedence.
    ``config_dir``: diffusers-layout config folder overriding the shipped configs; when None, the sidecar
    ``<checkpoint name without extension>.config`` next to the file is used if it exists.
    ``prediction_type``: overrides the scheduler's ("epsilon" for SD 1.5 and SD 2-base, "v_prediction" for
    the 768-v SD 2.x models).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise WeightsError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    if not path.is_file():
        raise WeightsError(f"checkpoint file not found: {path}")
    if not path.name.lower().endswith(SUFFIXES):
        raise WeightsError(f"{path} is not a single-file checkpoint: expected one of {', '.join(SUFFIXES)}")
    config_dir = resolve_config_dir(path, config_dir)

    checkpoint = load_state_dict(path)
    if isinstance(checkpoint.get("state_dict"), dict):  # original .ckpt files nest the weights
        checkpoint = checkpoint["state_dict"]
    if not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise WeightsError(f"{path} does not hold a flat state dict of tensors")
    family, in_channels = detect_family(checkpoint, str(path))
    configs = read_configs(family, config_dir)
    source = f"{path} ({FAMILIES[family][2]}, configs from {config_dir or CONFIGS / FAMILIES[family][0]})"

    unet_config = {**configs["unet"], "in_channels": in_channels}
    try:
        with empty_weights():
            unet = UNet2DConditionModel.from_config(unet_config)
            vae = AutoencoderKL.from_config(configs["vae"])
            text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
    except Exception as exc:
        raise WeightsError(f"could not build the models from the configs for {source}: {exc}") from exc

    try:
        unet_sd = convert_ldm_unet_checkpoint(checkpoint, unet.config)
        vae_sd = convert_ldm_vae_checkpoint(checkpoint, vae.config)
        text_sd = _text_encoder_state(family, text_encoder, checkpoint)
    except (KeyError, IndexError, RuntimeError, ValueError) as exc:
        raise WeightsError(f"could not convert the weights of {source}: {exc!r}") from exc
    del checkpoint
    try:
        load_into(unet, _cast(unet_sd, dtype), f"{source} [UNet]")
        load_into(vae, _cast(vae_sd, dtype), f"{source} [VAE]")
        load_into(text_encoder, _cast(text_sd, dtype), f"{source} [text encoder]")
    except WeightsError as exc:
        if config_dir is None:
            raise WeightsError(
                f"{exc}. The shipped configs describe {FAMILIES[family][2]} as released; for another "
                f"architecture put its diffusers-layout configs in {sidecar_config_dir(path)}"
            ) from exc
        raise
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)

    tokenizer = _build_tokenizer(family, configs, config_dir, tokenizer_dir)
    scheduler_config = dict(configs["scheduler"])
    if prediction_type is not None:
        scheduler_config["prediction_type"] = prediction_type
    return SDComponents(unet, vae, text_encoder, tokenizer, scheduler_config, str(path), dtype)
