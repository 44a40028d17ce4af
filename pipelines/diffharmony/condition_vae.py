"""DiffHarmony's condition VAE (the archive's ``condition_vae/``, from the authors' "DiffHarmony++").

A VAE whose decoder also sees the composite it harmonizes, so that what the 8x-compressed latent blurs (text,
faces, fine texture of the pasted object) comes back from the full-resolution composite. Facts of the authors'
code (reference/diffharmony.md, "Condition VAE"; their ``ConditionVAE``, ``EncoderSkip``, ``DecoderSkip``):

- ``encoder``: the plain VAE encoder (frozen in training, a copy of the base VAE's);
- ``conditional_encoder``: the encoder's layers fed the condition ``[composite in [-1, 1], mask]``; the first
  3 channels go through ``conv_in``, the extra mask channel through ``add_conv_in`` and the two are added. Every
  down-path state (``conv_in``'s output, each resnet's output, each downsampler's output) and the mid block's
  output pass through a zero-initialised 1x1 convolution (``down_block_skip_convs``, ``mid_block_skip_conv``);
  the conv that follows a downsampler maps to the next level's width, the width the decoder has there;
- ``decoder``: the plain decoder's layers; the mid-block skip is added after the mid block, and each up-block
  resnet adds one down-path skip, deepest first (the up block at a level takes that level's last
  ``layers_per_block + 1`` skips and consumes them from the end);
- ``quant_conv``, ``post_quant_conv`` and a zero-initialised 1x1 ``latent_skip_conv``;
- ``decode_with_cond(z, cond)``: the condition's moments (``quant_conv`` of the conditional encoder's output)
  form a diagonal Gaussian that the authors' pipeline SAMPLES with its generator; the decoder gets
  ``post_quant_conv(z) + latent_skip_conv(post_quant_conv(z_cond))`` and the skips. ``z`` is the harmonized
  latent divided by the scaling factor.

With all zero-initialised convolutions at zero it decodes exactly like its own plain decoder.

Tiling (``enable_tiling``, used above the pipeline's ``VAE_TILING_ABOVE``): diffusers' ``AutoencoderKL`` tiling
(tiles of the config's ``sample_size``, overlapping by a quarter, blended linearly), applied to the condition
path too: each latent tile is decoded with the condition tile under it, whose conditional-encoder skips match
the decoder's tile, and the condition's posterior draw is made once at full size and cut like the latent, so
it does not depend on the tiling. With all skips at zero a tiled decode equals diffusers' tiled decode. Parameter names
are the authors' (the decoder's and both encoders' layers are diffusers' ``Encoder``/``Decoder`` layers, whose
names theirs reuse), so the released file loads with strict key checking.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core import images, model_files
from ..core.errors import InputError, WeightsError
from ..core.weights import check_keys, empty_weights, load_state_dict, own_memory

FOLDER = "condition_vae"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin")
CONFIG_DEFAULTS = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(64,), layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=32,
    sample_size=32, additional_in_channels=1, scaling_factor=0.18215, force_upcast=True,
)


class _Config(dict):
    """The config as a dict with attribute access (``cvae.config.scaling_factor``), like diffusers models."""

    __getattr__ = dict.__getitem__


def _zero_conv(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ConditionalEncoder(nn.Module):
    """The VAE encoder's layers plus ``add_conv_in`` and the zero-initialised skip convolutions."""

    def __init__(self, cfg: dict):
        super().__init__()
        from diffusers.models.autoencoders.vae import Encoder

        ch = list(cfg["block_out_channels"])
        self.in_channels = cfg["in_channels"]
        plain = Encoder(in_channels=cfg["in_channels"], out_channels=cfg["latent_channels"],
                        down_block_types=tuple(cfg["down_block_types"]), block_out_channels=tuple(ch),
                        layers_per_block=cfg["layers_per_block"], norm_num_groups=cfg["norm_num_groups"],
                        act_fn=cfg["act_fn"], double_z=True)
        self.conv_in, self.down_blocks, self.mid_block = plain.conv_in, plain.down_blocks, plain.mid_block
        self.conv_norm_out, self.conv_act, self.conv_out = plain.conv_norm_out, plain.conv_act, plain.conv_out
        if cfg["additional_in_channels"] > 0:
            self.add_conv_in = nn.Conv2d(cfg["additional_in_channels"], ch[0], kernel_size=3, padding=1)
        skips = [_zero_conv(ch[0], ch[0])]  # conv_in's output
        for i in range(len(ch)):
            skips += [_zero_conv(ch[i], ch[i]) for _ in range(cfg["layers_per_block"])]
            if i < len(ch) - 1:  # the downsampler's output, at the next level where the decoder is ch[i+1] wide
                skips.append(_zero_conv(ch[i], ch[i + 1]))
        self.down_block_skip_convs = nn.ModuleList(skips)
        self.mid_block_skip_conv = _zero_conv(ch[-1], ch[-1])

    def forward(self, cond: torch.Tensor):
        """-> (moments before quant_conv, down-path skips shallow to deep, mid-block skip)."""
        h = self.conv_in(cond[:, : self.in_channels])
        if hasattr(self, "add_conv_in"):
            h = self.add_conv_in(cond[:, self.in_channels:]) + h
        states = [h]
        for block in self.down_blocks:
            for resnet in block.resnets:
                h = resnet(h, None)
                states.append(h)
            for down in block.downsamplers or ():
                h = down(h)
                states.append(h)
        h = self.mid_block(h)
        mid_skip = self.mid_block_skip_conv(h)
        out = self.conv_out(self.conv_act(self.conv_norm_out(h)))
        skips = [conv(s) for conv, s in zip(self.down_block_skip_convs, states, strict=True)]
        return out, skips, mid_skip


class ConditionVAE(nn.Module):
    """The authors' ``ConditionVAE`` (same config fields, same parameter names)."""

    def __init__(self, **config):
        super().__init__()
        from diffusers.models.autoencoders.vae import Decoder, Encoder

        cfg = _Config({**CONFIG_DEFAULTS, **{k: v for k, v in config.items() if k in CONFIG_DEFAULTS}})
        self.config = cfg
        ch = tuple(cfg["block_out_channels"])
        common = dict(block_out_channels=ch, layers_per_block=cfg["layers_per_block"],
                      norm_num_groups=cfg["norm_num_groups"], act_fn=cfg["act_fn"])
        self.encoder = Encoder(in_channels=cfg["in_channels"], out_channels=cfg["latent_channels"],
                               down_block_types=tuple(cfg["down_block_types"]), double_z=True, **common)
        self.conditional_encoder = ConditionalEncoder(cfg)
        self.decoder = Decoder(in_channels=cfg["latent_channels"], out_channels=cfg["out_channels"],
                               up_block_types=tuple(cfg["up_block_types"]), **common)
        lc = cfg["latent_channels"]
        self.quant_conv = nn.Conv2d(2 * lc, 2 * lc, 1)
        self.post_quant_conv = nn.Conv2d(lc, lc, 1)
        self.latent_skip_conv = _zero_conv(lc, lc)
        self.use_tiling = False

    def enable_tiling(self) -> None:
        """Encode and decode in overlapping tiles (as diffusers' ``AutoencoderKL.enable_tiling``)."""
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    @property
    def tile_sample_size(self) -> int:
        size = self.config["sample_size"]
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def tile_latent_size(self) -> int:
        return int(self.tile_sample_size / self.scale_factor)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    def encode(self, x: torch.Tensor):
        """The plain encoder (the authors' pipeline encodes the composite with it): an object with
        ``latent_dist``, like diffusers' ``AutoencoderKL.encode``."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        t = self.tile_sample_size
        if self.use_tiling and max(x.shape[-2:]) > t:
            moments = tiled(lambda i, j: self.quant_conv(self.encoder(x[:, :, i:i + t, j:j + t])), x.shape[-2],
                            x.shape[-1], t, self.tile_latent_size)
        else:
            moments = self.quant_conv(self.encoder(x))
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(moments))

    def encode_cond(self, cond: torch.Tensor):
        """-> (posterior of the condition, down-path skips, mid-block skip)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        moments, skips, mid_skip = self.conditional_encoder(cond)
        return DiagonalGaussianDistribution(self.quant_conv(moments)), skips, mid_skip

    def decode_skips(self, z: torch.Tensor, skips: list[torch.Tensor], mid_skip: torch.Tensor) -> torch.Tensor:
        """The decoder's layers with the skips added (``z`` already through ``post_quant_conv``)."""
        dec = self.decoder
        h = dec.mid_block(dec.conv_in(z), None) + mid_skip
        skips = list(skips)
        for block in dec.up_blocks:
            for resnet in block.resnets:
                h = resnet(h, None) + skips.pop()
            for up in block.upsamplers or ():
                h = up(h)
        if skips:
            raise WeightsError(f"condition VAE: {len(skips)} skip states were left over; the config's blocks "
                               f"do not pair up")
        return dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))

    def decode_with_cond(self, z: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None,
                         sample_posterior: bool = True) -> torch.Tensor:
        """Unscaled latents ``z`` + condition ``[B, 3 + additional_in_channels, H, W]`` -> image in [-1, 1]."""
        posterior, skips, mid_skip = self.encode_cond(cond)
        z_cond = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        h = self.post_quant_conv(z) + self.latent_skip_conv(self.post_quant_conv(z_cond))
        return self.decode_skips(h, skips, mid_skip)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The plain decode (no condition), as an ``AutoencoderKL`` decodes."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, sample: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None,
                sample_posterior: bool = True) -> torch.Tensor:
        """Training pass of the authors' objective: encode ``sample`` with the plain encoder, draw from its
        posterior, decode with the condition (both posteriors sampled from ``generator``)."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode_with_cond(z, cond, generator, sample_posterior)

    # ------------------------------------------------------------------------------------------- building
    @classmethod
    def from_vae(cls, vae, additional_in_channels: int = 1) -> "ConditionVAE":
        """A new condition VAE from a diffusers ``AutoencoderKL`` as the authors' training starts one: the
        encoder, decoder and quant convs copied, the conditional encoder's layers copied from the encoder (its
        ``add_conv_in`` fresh), every skip convolution at zero."""
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(vae.config).items()
               if k in CONFIG_DEFAULTS}
        model = cls(**{**cfg, "additional_in_channels": additional_in_channels})
        model.encoder.load_state_dict(vae.encoder.state_dict())
        model.decoder.load_state_dict(vae.decoder.state_dict())
        model.quant_conv.load_state_dict(vae.quant_conv.state_dict())
        model.post_quant_conv.load_state_dict(vae.post_quant_conv.state_dict())
        for name in ("conv_in", "down_blocks", "mid_block", "conv_norm_out", "conv_out"):
            getattr(model.conditional_encoder, name).load_state_dict(getattr(vae.encoder, name).state_dict())
        return model.to(vae.dtype)

    def trainable(self, freeze_decoder: bool = False) -> "ConditionVAE":
        """What the authors train: the conditional encoder, ``latent_skip_conv`` and (unless frozen) the
        decoder; the encoder and the quant convs stay as the base VAE's."""
        self.requires_grad_(False)
        self.conditional_encoder.requires_grad_(True)
        self.latent_skip_conv.requires_grad_(True)
        if not freeze_decoder:
            self.decoder.requires_grad_(True)
        return self

    def config_json(self) -> dict:
        return {"_class_name": "ConditionVAE",
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in self.config.items()}}


# ---------------------------------------------------------------------------------------------- files
def condition_vae_folder(path: str | os.PathLike) -> Path:
    """The ``condition_vae/`` folder itself, or the archive root (or its ``base/``) that has one beside."""
    path = Path(path)
    for cand in candidate_folders(path):
        if (cand / "config.json").is_file():
            return cand
    raise WeightsError(
        f"no condition VAE found: looked for config.json in {', '.join(str(c) for c in candidate_folders(path))}. "
        f"Expected the DiffHarmony archive's {FOLDER}/ folder (config.json + diffusion_pytorch_model.safetensors) "
        f"beside base/.")


def candidate_folders(path: Path) -> list[Path]:
    """Where a condition VAE for the model at ``path`` is looked for, in order."""
    path = Path(path)
    if path.is_file():  # a single-file checkpoint: a condition_vae/ beside it
        return [path.parent / FOLDER]
    out = [path, path / FOLDER]
    if path.name == "base":
        out.append(path.parent / FOLDER)
    return out


def is_condition_vae_folder(folder: Path) -> bool:
    """A folder with weights and a config.json naming ``additional_in_channels`` (the authors' ConditionVAE
    config), e.g. ``<archive>/condition_vae``."""
    cfg = folder / "config.json"
    if not cfg.is_file() or not any((folder / w).is_file() for w in WEIGHT_NAMES):
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "additional_in_channels" in data


def find_condition_vaes(roots) -> dict[str, Path]:
    """Condition VAEs under ``roots`` (see :func:`is_condition_vae_folder`)."""
    return model_files.find(roots, model_dir=is_condition_vae_folder)


def load_condition_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> ConditionVAE:
    """Load ``condition_vae/`` (or find it in the archive at ``path``) with strict key checking."""
    folder = condition_vae_folder(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"cannot read {folder / 'config.json'}: {exc}") from exc
    if not isinstance(config, dict) or "block_out_channels" not in config:
        raise WeightsError(f"{folder / 'config.json'} is not a VAE config (no block_out_channels)")
    weights = next((folder / w for w in WEIGHT_NAMES if (folder / w).is_file()), None)
    if weights is None:
        raise WeightsError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_NAMES)}")
    with empty_weights():
        model = ConditionVAE(**config)
    state = load_state_dict(weights)
    check_keys(model.state_dict(), state, str(weights), "a condition VAE of the config beside it (the authors' "
               "ConditionVAE layout was expected)")
    model.load_state_dict(state, strict=True, assign=True)
    return own_memory(model.to(dtype)).eval().requires_grad_(False)


def save_condition_vae(model: ConditionVAE, folder: str | os.PathLike) -> Path:
    """config.json + diffusion_pytorch_model.safetensors, the layout of the archive's ``condition_vae/``.
    The folder must not exist (nothing is overwritten)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=False)
    (folder / "config.json").write_text(json.dumps(model.config_json(), indent=1))
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHT_NAMES[0]), metadata={"format": "pt"})
    return folder


# ------------------------------------------------------------------------------------------ decoding
def condition(composite: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[composite in [-1, 1], binarised mask]`` at ``size`` ``[B, 4, H, W]``: the whole composite resized as
    the encode stage resizes it, the mask binarised at 0.5 and brought to ``size`` by nearest neighbour."""
    composite, mask = images.image_and_mask(composite, mask)
    return condition_unchecked(composite, mask, size)


def condition_unchecked(composite: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """:func:`condition` on a composite and mask already checked (``images.image_and_mask``)."""
    x = images.to_signed(images.resize_images(composite, size))
    m = F.interpolate((mask.float() >= 0.5).float()[:, None], size=tuple(size), mode="nearest")
    return torch.cat([x, m], dim=1)


@torch.no_grad()
def decode(cvae: ConditionVAE, latents: torch.Tensor, composite: torch.Tensor, mask: torch.Tensor,
           generator: torch.Generator | None = None, sample_posterior: bool = True,
           cond: torch.Tensor | None = None) -> torch.Tensor:
    """UNSCALED latents ``[B,4,h,w]`` -> IMAGE ``[B,8h,8w,3]`` decoded with the condition built from the
    composite and mask (or ``cond`` given ready, ``[B,4,8h,8w]`` in the authors' ranges). The condition's
    posterior is sampled with ``generator`` (drawn on the CPU), or its mode taken."""
    if latents.dim() != 4 or latents.shape[1] != cvae.config["latent_channels"]:
        raise InputError(f"latents must be [B,{cvae.config['latent_channels']},h,w], got {tuple(latents.shape)}")
    b, _, h, w = latents.shape
    size = (h * cvae.scale_factor, w * cvae.scale_factor)
    if cond is None:
        cond = condition(composite, mask, size)
    want = 3 + cvae.config["additional_in_channels"]
    if cond.shape[1] != want or tuple(cond.shape[-2:]) != size:
        raise InputError(f"condition must be [B,{want},{size[0]},{size[1]}], got {tuple(cond.shape)}")
    if cond.shape[0] not in (1, b):
        raise InputError(f"batch mismatch: {b} latents but {cond.shape[0]} composites")
    return images.from_signed(decode_signed(cvae, latents, cond.expand(b, *cond.shape[1:]), generator,
                                            sample_posterior))


@torch.no_grad()
def decode_signed(cvae: ConditionVAE, latents: torch.Tensor, cond: torch.Tensor,
                  generator: torch.Generator | None = None, sample_posterior: bool = True) -> torch.Tensor:
    """``decode`` on a ready condition, returning ``[B,3,H,W]`` in the decoder's range (about [-1, 1])."""
    device, dtype = cvae.device, cvae.dtype
    z = latents.to(device=device, dtype=dtype)
    cond = cond.to(device=device, dtype=dtype)
    noise = None
    if sample_posterior:  # drawn on the CPU in float32 so every device gives the same draw; the posterior has
        # the latent's shape, so the draw is made once here, whole, and a tile takes its part of it
        noise = torch.randn(z.shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    def run(z, cond, noise):
        posterior, skips, mid_skip = cvae.encode_cond(cond)
        z_cond = posterior.mode() if noise is None else posterior.mean + posterior.std * noise
        hidden = cvae.post_quant_conv(z) + cvae.latent_skip_conv(cvae.post_quant_conv(z_cond))
        return cvae.decode_skips(hidden, skips, mid_skip)

    t, s = cvae.tile_latent_size, cvae.scale_factor
    if not (cvae.use_tiling and max(z.shape[-2:]) > t):
        return run(z, cond, noise)

    def tile(i, j):
        return run(z[:, :, i:i + t, j:j + t], cond[:, :, s * i:s * (i + t), s * j:s * (j + t)],
                   None if noise is None else noise[:, :, i:i + t, j:j + t])

    return tiled(tile, z.shape[-2], z.shape[-1], t, cvae.tile_sample_size)


# ------------------------------------------------------------------------------------------- tiling
TILE_OVERLAP = 0.25  # diffusers' AutoencoderKL.tile_overlap_factor


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Ramp the first ``extent`` rows (dim 2) or columns (dim 3) of ``b`` from ``a``'s last ones, in place, as
    diffusers' ``blend_v`` / ``blend_h`` do."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    for k in range(extent):
        b.select(dim, k).copy_(a.select(dim, a.shape[dim] - extent + k) * (1 - k / extent)
                               + b.select(dim, k) * (k / extent))
    return b


def tiled(fn, height: int, width: int, tile: int, out_tile: int) -> torch.Tensor:
    """diffusers' tiled encode/decode scheme for any tile function: ``fn(i, j)`` maps the input tile of side
    ``tile`` at (i, j) of a ``height`` x ``width`` input to its output of side ``out_tile``; tiles step by
    ``tile * (1 - TILE_OVERLAP)``, each is blended with the one above and the one to its left over a quarter
    of ``out_tile``, and cut to what it alone contributes."""
    step = int(tile * (1 - TILE_OVERLAP))
    extent = int(out_tile * TILE_OVERLAP)
    limit = out_tile - extent
    rows = [[fn(i, j) for j in range(0, width, step)] for i in range(0, height, step)]
    out = []
    for i, row in enumerate(rows):
        line = []
        for j, t in enumerate(row):
            if i > 0:
                t = _blend(rows[i - 1][j], t, extent, 2)
            if j > 0:
                t = _blend(row[j - 1], t, extent, 3)
            line.append(t[:, :, :limit, :limit])
        out.append(torch.cat(line, dim=3))
    return torch.cat(out, dim=2)
