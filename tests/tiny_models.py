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


# comfy_layout=True: the tiny models with Stable Diffusion's 32-group GroupNorms (and VAE widths that allow
# them), the one thing ComfyUI's own UNet/VAE classes fix regardless of width; for the native-path tests.
def unet_config(in_channels: int = 9, comfy_layout: bool = False) -> dict:
    return dict(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CROSS_DIM,
        attention_head_dim=8, norm_num_groups=32 if comfy_layout else 8,
    )


def tiny_unet(in_channels: int = 9, seed: int = 0, comfy_layout: bool = False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config(in_channels, comfy_layout)).eval()


def vae_config(comfy_layout: bool = False) -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32 if comfy_layout else 8,
        block_out_channels=(32, 32, 32, 32) if comfy_layout else (8, 16, 16, 16), sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )


def tiny_vae(seed: int = 1, comfy_layout: bool = False):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**vae_config(comfy_layout)).eval()


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
                            seed: int = 0, pipeline_class: str | None = None, comfy_layout: bool = False) -> Path:
    """A diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).
    ``weights="bin"`` writes unet/vae/text_encoder as pickled ``.bin`` files, like the DiffHarmony archive."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(folder / "tokenizer")
    unet = tiny_unet(in_channels, seed, comfy_layout)
    vae = tiny_vae(seed + 1, comfy_layout)
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


# --- single-file (original LDM/CompVis layout) checkpoints -------------------------------------------------
# The reverse of the LDM -> diffusers conversion, written from the naming facts of the two layouts
# (ldm's openaimodel/autoencoder modules vs diffusers' UNet2DConditionModel/AutoencoderKL, and the
# transformers vs open_clip text towers), so tests can produce the files users download.

_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_LDM_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _ldm_resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_LDM_RESNET[head]}.{tail}"


def ldm_unet_state_dict(unet) -> dict:
    """diffusers UNet2DConditionModel weights under the LDM ``model.diffusion_model.*`` names."""
    cfg = unet.config
    per = cfg.layers_per_block + 1  # LDM input/output block slots per diffusers block
    has_attn = ["CrossAttn" in t for t in cfg.up_block_types]
    out = {}
    for key, value in unet.state_dict().items():
        p = key.split(".")
        rest = ".".join(p[4:]) if len(p) > 4 else ""
        if p[0] == "conv_in":
            new = f"input_blocks.0.0.{p[1]}"
        elif p[0] == "time_embedding":
            new = f"time_embed.{ {'linear_1': 0, 'linear_2': 2}[p[1]] }.{p[2]}"
        elif p[0] == "conv_norm_out":
            new = f"out.0.{p[1]}"
        elif p[0] == "conv_out":
            new = f"out.2.{p[1]}"
        elif p[0] == "down_blocks":
            b, kind, i = int(p[1]), p[2], int(p[3])
            if kind == "resnets":
                new = f"input_blocks.{1 + b * per + i}.0.{_ldm_resnet(rest)}"
            elif kind == "attentions":
                new = f"input_blocks.{1 + b * per + i}.1.{rest}"
            else:  # downsamplers.0.conv.*
                new = f"input_blocks.{(b + 1) * per}.0.op.{p[-1]}"
        elif p[0] == "mid_block":
            kind, i, rest = p[1], int(p[2]), ".".join(p[3:])
            new = (f"middle_block.{2 * i}.{_ldm_resnet(rest)}" if kind == "resnets"
                   else f"middle_block.1.{rest}")
        elif p[0] == "up_blocks":
            b, kind, i = int(p[1]), p[2], int(p[3])
            if kind == "resnets":
                new = f"output_blocks.{b * per + i}.0.{_ldm_resnet(rest)}"
            elif kind == "attentions":
                new = f"output_blocks.{b * per + i}.1.{rest}"
            else:  # upsamplers.0.conv.*
                new = f"output_blocks.{b * per + per - 1}.{2 if has_attn[b] else 1}.conv.{p[-1]}"
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def ldm_vae_state_dict(vae) -> dict:
    """diffusers AutoencoderKL weights under the LDM ``first_stage_model.*`` names (attention as 1x1 convs)."""
    n_up = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        p = key.split(".")
        if p[0] in ("quant_conv", "post_quant_conv"):
            new = key
        elif p[1] in ("conv_in", "conv_out"):
            new = key
        elif p[1] == "conv_norm_out":
            new = f"{p[0]}.norm_out.{p[2]}"
        elif p[1] in ("down_blocks", "up_blocks"):
            b, kind = int(p[2]), p[3]
            stage = "down" if p[1] == "down_blocks" else "up"
            b = b if stage == "down" else n_up - 1 - b  # LDM numbers decoder levels from the bottom
            if kind == "resnets":
                new = f"{p[0]}.{stage}.{b}.block.{p[4]}." + ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
            else:  # downsamplers/upsamplers.0.conv.*
                new = f"{p[0]}.{stage}.{b}.{'downsample' if stage == 'down' else 'upsample'}.conv.{p[-1]}"
        elif p[1] == "mid_block":
            if p[2] == "resnets":
                new = f"{p[0]}.mid.block_{int(p[3]) + 1}." + ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
            else:
                sub = ".".join(p[4:-1])
                new = f"{p[0]}.mid.attn_1.{_LDM_VAE_ATTN[sub]}.{p[-1]}"
                if value.ndim == 2:
                    value = value[:, :, None, None]
        else:
            raise KeyError(f"no LDM name for VAE key {key}")
        out["first_stage_model." + new] = value
    return out


def _text_keys(text_encoder) -> dict:
    return {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}


def ldm_clip_state_dict(text_encoder) -> dict:
    """SD 1.x: the transformers CLIPTextModel under ``cond_stage_model.transformer.text_model.*``, with the
    ``position_ids`` buffer older transformers versions saved into the released files."""
    out = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in _text_keys(text_encoder).items()}
    n_pos = text_encoder.config.max_position_embeddings
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(n_pos)[None]
    return out


def open_clip_state_dict(text_encoder, seed: int = 3) -> dict:
    """SD 2.x: the text tower in open_clip's layout under ``cond_stage_model.model.*``: fused in_proj
    attention weights, ln_1/ln_2/c_fc/c_proj names, plus what SD 2 does not use (one more final resblock,
    since it conditions on the penultimate layer; text_projection; logit_scale)."""
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    sd = _text_keys(text_encoder)
    pre = "cond_stage_model.model."
    out = {pre + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           pre + "positional_embedding": sd["embeddings.position_embedding.weight"],
           pre + "ln_final.weight": sd["final_layer_norm.weight"], pre + "ln_final.bias": sd["final_layer_norm.bias"]}
    n_layers = text_encoder.config.num_hidden_layers
    for i in range(n_layers):
        lp, rp = f"encoder.layers.{i}.", f"{pre}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[rp + f"attn.in_proj_{kind}"] = torch.cat([sd[lp + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            for ours, theirs in names.items():
                out[rp + f"{theirs}.{kind}"] = sd[lp + f"{ours}.{kind}"]
    g = torch.Generator().manual_seed(seed)
    for key in [k for k in out if k.startswith(f"{pre}transformer.resblocks.{n_layers - 1}.")]:
        extra = key.replace(f"resblocks.{n_layers - 1}.", f"resblocks.{n_layers}.")
        out[extra] = torch.randn(out[key].shape, generator=g) * 0.02
    hidden = text_encoder.config.hidden_size
    out[pre + "text_projection"] = torch.randn(hidden, hidden, generator=g) * 0.02
    out[pre + "logit_scale"] = torch.tensor(4.6052)
    return out


def save_single_file(path: str | os.PathLike, unet, vae, text_encoder, family: str, tokenizer: bool = True,
                     sidecar: bool = True) -> Path:
    """Write ``unet``/``vae``/``text_encoder`` as one LDM-layout checkpoint (``.safetensors``, or a
    ``{"state_dict": ...}`` tensor-only ``.ckpt``) for ``family`` "sd1" (CLIP keys) or "sd2" (OpenCLIP
    keys), plus, with ``sidecar``, the ``<stem>.config`` folder the loader reads (diffusers-layout configs,
    and with ``tokenizer`` the tiny tokenizer the tiny text encoder was built for)."""
    from safetensors.torch import save_file

    path = Path(path)
    if family not in ("sd1", "sd2"):
        raise ValueError(f"family must be 'sd1' or 'sd2', got {family!r}")
    text = ldm_clip_state_dict(text_encoder) if family == "sd1" else open_clip_state_dict(text_encoder)
    state = {**ldm_unet_state_dict(unet), **ldm_vae_state_dict(vae), **text}
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    state["alphas_cumprod"] = torch.linspace(0.999, 0.005, 1000)  # LDM files also carry schedule buffers
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path), metadata={"format": "pt"})
    else:
        torch.save({"state_dict": state, "global_step": 0}, path)
    if sidecar:
        cfg = path.with_name(path.stem + ".config")
        unet.save_config(cfg / "unet")
        vae.save_config(cfg / "vae")
        text_encoder.config.save_pretrained(cfg / "text_encoder")
        (cfg / "scheduler").mkdir(parents=True, exist_ok=True)
        (cfg / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))
        if tokenizer:
            tok = write_tiny_tokenizer(cfg / "tokenizer")
            if family == "sd2":  # SD 2's tokenizer pads with "!" (id 0)
                for name in ("tokenizer_config.json", "special_tokens_map.json"):
                    data = json.loads((tok / name).read_text(encoding="utf-8"))
                    data["pad_token"] = "!"
                    (tok / name).write_text(json.dumps(data), encoding="utf-8")
    return path


def write_refiner(folder: Path, in_channels: int = 7, seed: int = 5) -> Path:
    """A refinement/ folder as released: config.json + diffusion_pytorch_model.safetensors."""
    from safetensors.torch import save_file

    from comfyui_harmonize.pipelines.diffharmony.refiner import RefinerUNet

    folder.mkdir(parents=True, exist_ok=True)
    cfg = refiner_config(in_channels)
    torch.manual_seed(seed)
    model = RefinerUNet(**cfg)
    with torch.no_grad():  # a visible residual, so a test notices when the refiner is skipped
        model.conv_out.weight.normal_(0, 0.05)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "diffusion_pytorch_model.safetensors")
    return folder


# --- the DiffHarmony archive's condition_vae/ and inverse/ ----------------------------------------------------
# condition_vae/: the authors' ConditionVAE as their save_pretrained writes it (config.json = the base VAE's
# AutoencoderKL fields + additional_in_channels; diffusion_pytorch_model.safetensors). The state dict is written
# here from the facts of their code, independently of the pack's model class: encoder/decoder/quant convs are
# an AutoencoderKL's; conditional_encoder repeats the encoder's layers and adds add_conv_in (the mask channel),
# one 1x1 skip conv per down-path state (conv_in's output, each resnet, each downsampler; the one after a
# downsampler maps to the next level's width) and mid_block_skip_conv; latent_skip_conv is 1x1 on the latent.

def condition_vae_config() -> dict:
    return {"_class_name": "ConditionVAE", "_diffusers_version": "0.26.3", **vae_config(),
            "act_fn": "silu", "additional_in_channels": 1, "scaling_factor": 0.18215, "force_upcast": True}


def condition_vae_state_dict(seed: int = 7, zero_skips: bool = False, vae_seed: int = 1) -> dict:
    """Random weights under the authors' parameter names, the encoder a copy of the tiny archive's base/vae
    (``tiny_vae(1)``), as their training keeps it. Skip convs are random (so a test sees them act) unless
    ``zero_skips``, as the authors' training starts them."""
    cfg = vae_config()
    vae = tiny_vae(vae_seed)
    g = torch.Generator().manual_seed(seed + 100)

    def rnd(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    sd = {}
    for part in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
        sd.update({f"{part}.{k}": v.clone() for k, v in getattr(vae, part).state_dict().items()})
    for k, v in vae.encoder.state_dict().items():  # the conditional encoder: the encoder's layers, own weights
        sd[f"conditional_encoder.{k}"] = v + rnd(*v.shape, scale=0.02)
    ch, lat = cfg["block_out_channels"], cfg["latent_channels"]
    sd["conditional_encoder.add_conv_in.weight"] = rnd(ch[0], 1, 3, 3)
    sd["conditional_encoder.add_conv_in.bias"] = rnd(ch[0])
    widths = [(ch[0], ch[0])]
    for i, c in enumerate(ch):
        widths += [(c, c)] * cfg["layers_per_block"]
        if i < len(ch) - 1:
            widths.append((c, ch[i + 1]))
    skip_names = [(f"conditional_encoder.down_block_skip_convs.{i}", w) for i, w in enumerate(widths)]
    skip_names += [("conditional_encoder.mid_block_skip_conv", (ch[-1], ch[-1])), ("latent_skip_conv", (lat, lat))]
    for name, (c_in, c_out) in skip_names:
        scale = 0.0 if zero_skips else 0.1
        sd[f"{name}.weight"] = rnd(c_out, c_in, 1, 1, scale=scale)
        sd[f"{name}.bias"] = rnd(c_out, scale=scale)
    return {k: v.contiguous() for k, v in sd.items()}


def write_condition_vae(folder: Path, seed: int = 7, zero_skips: bool = False) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(condition_vae_config()))
    save_file(condition_vae_state_dict(seed, zero_skips), folder / "diffusion_pytorch_model.safetensors")
    return folder


def write_inverse(folder: Path, seed: int = 11, step: int = 1000) -> Path:
    """inverse/ ("diffharmony-gen"): the UNet trained real -> composite, saved by the authors' training script
    as ``weights-<step>/`` (UNet2DConditionModel.save_pretrained: config.json + safetensors)."""
    folder = Path(folder)
    unet = tiny_unet(9, seed)
    with torch.no_grad():  # a visibly different model from base/'s
        unet.conv_out.weight.mul_(3.0)
    unet.save_pretrained(folder / f"weights-{step}", safe_serialization=True)
    return folder
