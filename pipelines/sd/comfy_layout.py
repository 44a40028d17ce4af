"""Stable Diffusion configs in the layout ComfyUI's own model classes take, computed from diffusers configs.

ComfyUI builds its UNet (``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel``), VAE
(``comfy.ldm.models.autoencoder.AutoencoderKL``) and CLIP text model from the original (LDM/CompVis) layout.
Its detection knows the published sizes only (SD 1.5 is ``model_channels=320, context_dim=768``), so a
model of another width (a pruned or distilled UNet, the tiny test models) needs its layout spelled out.
These functions do that from a diffusers ``config.json``; they are plain dict arithmetic and import nothing
from ComfyUI (the host module hands the results to ComfyUI's classes).
"""
from __future__ import annotations

from ..core.errors import WeightsError


def _per_block(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * n


def unet_key_layout(config: dict) -> dict:
    """The fields of ComfyUI's ``unet_config`` that ``comfy.utils.unet_to_diffusers`` needs to map a
    diffusers ``UNet2DConditionModel`` state dict onto the LDM keys: res blocks and transformer depth per
    level, in the order ComfyUI counts them (down path per res block; up path per level and res block + 1,
    shallowest level first; the middle block's depth)."""
    blocks = list(config["block_out_channels"])
    n = len(blocks)
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    if len(down_types) != n or len(up_types) != n:
        raise WeightsError(f"UNet config has {n} block_out_channels but {len(down_types)} down and "
                           f"{len(up_types)} up block types")
    layers = _per_block(config.get("layers_per_block", 2), n)
    depth = _per_block(config.get("transformer_layers_per_block", 1), n)
    down_depth = [depth[i] if "CrossAttn" in t else 0 for i, t in enumerate(down_types)]
    up_depth = [d if "CrossAttn" in t else 0 for d, t in zip(reversed(depth), up_types)]  # up_blocks.0 = deepest
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn") or ""
    return {
        "num_res_blocks": layers,
        "channel_mult": [c // blocks[0] for c in blocks],
        "transformer_depth": [d for i, d in enumerate(down_depth) for _ in range(layers[i])],
        # level l (shallowest first) repeated layers+1 times; the deepest level is popped first for up_blocks.0
        "transformer_depth_output": [d for lvl, d in enumerate(reversed(up_depth))
                                     for _ in range(layers[lvl] + 1)],
        "transformer_depth_middle": depth[-1] if "CrossAttn" in mid else 0,
    }


def vae_ddconfig(config: dict) -> dict:
    """ComfyUI's ``AutoencoderKL(ddconfig=..., embed_dim=...)`` arguments for a diffusers ``AutoencoderKL``
    config (SD-style encoder/decoder, mid-block attention, no attention in the resolution levels)."""
    blocks = list(config["block_out_channels"])
    if any(c % blocks[0] for c in blocks):
        raise WeightsError(f"VAE block_out_channels {blocks} are not multiples of the first: not an SD VAE layout")
    z = int(config.get("latent_channels", 4))
    ddconfig = {"double_z": True, "z_channels": z, "resolution": int(config.get("sample_size", 256)),
                "in_channels": int(config.get("in_channels", 3)), "out_ch": int(config.get("out_channels", 3)),
                "ch": blocks[0], "ch_mult": [c // blocks[0] for c in blocks],
                "num_res_blocks": int(config.get("layers_per_block", 2)), "attn_resolutions": [], "dropout": 0.0}
    return {"ddconfig": ddconfig, "embed_dim": z}


def clip_text_config(config: dict) -> dict:
    """The ``textmodel_json_config`` ComfyUI's ``SDClipModel`` takes, from a transformers ``CLIPTextConfig``
    (SD 1.x: the CLIP ViT-L/14 text tower; the same keys describe smaller ones)."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
            "max_position_embeddings", "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id",
            "pad_token_id", "projection_dim")
    out = {k: config[k] for k in keys if k in config}
    out.setdefault("hidden_act", "quick_gelu")
    out.setdefault("projection_dim", out.get("hidden_size"))
    return out
