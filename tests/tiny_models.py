"""Tiny random-weight models saved in the real on-disk layouts, for CPU tests.

Every factory is seeded, so two calls give the same weights. Sizes keep the structural facts that
matter (VAE downscale factor 8, 9-channel inpainting UNet, CLIP tokenizer padded to 77 tokens) while
running in milliseconds on a CPU.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CROSS_DIM = 32


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet (a fact of the BPE format)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


TINY_WORDS = [
    "girl", "cat", "dog", "house", "bright", "dark", "winter", "autumn", "summer", "golden", "dusk",
    "cloudy", "snowy", "sunny", "dim", "warm", "cold", "night", "a", "photo", "of",
]


def write_tiny_tokenizer(folder: str | os.PathLike) -> Path:
    """A small CLIP BPE tokenizer (vocab.json + merges.txt) in the real file format."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for word in TINY_WORDS:  # merge each whole word left to right, last symbol carries </w>
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            merged = symbols[0] + symbols[1]
            if merged not in vocab_list:
                vocab_list.append(merged)
            symbols = [merged] + symbols[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}), encoding="utf-8")
    return folder


def tiny_tokenizer(folder: str | os.PathLike):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(folder)))


def unet_config(in_channels: int = 9) -> dict:
    return dict(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CROSS_DIM,
        attention_head_dim=8, norm_num_groups=8,
    )


def tiny_unet(in_channels: int = 9, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config(in_channels)).eval()


def vae_config() -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )


def tiny_vae(seed: int = 1):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**vae_config()).eval()


def tiny_text_encoder(vocab_size: int, seed: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=CROSS_DIM, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(cfg).eval()


SCHEDULER_CONFIG = {  # Stable Diffusion 1.x/2.x scheduler config (PNDM, scaled-linear betas)
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "prediction_type": "epsilon",
}


def save_diffusers_pipeline(folder: str | os.PathLike, in_channels: int = 9, weights: str = "safetensors",
                            seed: int = 0, pipeline_class: str | None = None) -> Path:
    """A diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).
    ``weights="bin"`` writes unet/vae/text_encoder as pickled ``.bin`` files, like the DiffHarmony archive."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(folder / "tokenizer")
    unet = tiny_unet(in_channels, seed)
    vae = tiny_vae(seed + 1)
    te = tiny_text_encoder(len(tok), seed + 2)
    safe = weights == "safetensors"
    unet.save_pretrained(folder / "unet", safe_serialization=safe)
    vae.save_pretrained(folder / "vae", safe_serialization=safe)
    te.save_pretrained(folder / "text_encoder", safe_serialization=True)
    if not safe:  # transformers 5 only writes safetensors; write the .bin the archive has by hand
        sd = {k: v.contiguous() for k, v in te.state_dict().items()}
        (folder / "text_encoder" / "model.safetensors").unlink()
        torch.save(sd, folder / "text_encoder" / "pytorch_model.bin")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))
    cls = pipeline_class or ("StableDiffusionInpaintPipeline" if in_channels == 9 else "StableDiffusionPipeline")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": cls, "_diffusers_version": "0.21.0",
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }))
    return folder


def refiner_config(in_channels: int = 7) -> dict:
    """Config in the layout of DiffHarmony's released refinement/config.json, scaled down."""
    return {
        "_class_name": "UNet2DCustom", "in_channels": in_channels, "out_channels": 3,
        "block_out_channels": [32, 32, 64, 64], "layers_per_block": 2, "sample_size": 32,
        "add_attention": True, "input_residual": True, "norm_num_groups": 32,
        "down_block_types": ["DownBlock2D"] * 4, "up_block_types": ["UpBlock2D"] * 4,
    }
