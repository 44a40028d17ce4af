"""DiffHarmony's residual refinement UNet (the released ``refinement/`` folder).

Architecture facts (reference/diffharmony.md; the released config.json is authoritative): diffusers UNet
blocks with no time embedding — conv_in 3x3, DownBlock2D x4 (conv downsample on all but the last),
UNetMidBlock2D with one attention block, UpBlock2D x4 with layers_per_block+1 resnets, GroupNorm -> SiLU ->
conv_out. Input ``[harmonized, mask, composite]`` (7 channels; 3 and 4 are also supported), images in
[-1, 1] and the mask in {0, 1}; the output is ``model(x) + x[:, :3]``, clamped to [-1, 1].
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

# diffusers and transformers are imported where first used: importing them adds seconds to ComfyUI's start-up
# (which imports every node module), while a graph that never loads this model does not need them.
from ..core import cancel as cancelling
from ..core import images, model_files
from ..core.errors import InputError, WeightsError
from ..core.weights import empty_weights, load_into, load_state_dict

CONFIG_KEYS = (
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
    "mid_block_scale_factor", "downsample_padding", "downsample_type", "upsample_type", "act_fn",
    "attention_head_dim", "norm_num_groups", "norm_eps", "add_attention", "input_residual", "sample_size",
)
DEFAULTS = dict(
    in_channels=7, out_channels=3, down_block_types=("DownBlock2D",) * 4, up_block_types=("UpBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, mid_block_scale_factor=1.0, downsample_padding=0,
    downsample_type="conv", upsample_type="conv", act_fn="silu", attention_head_dim=None, norm_num_groups=32,
    norm_eps=1e-6, add_attention=True, input_residual=True, sample_size=256,
)


class RefinerUNet(nn.Module):
    """Residual refinement UNet; parameter names match the released safetensors."""

    def __init__(self, **config):
        super().__init__()
        from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block, get_up_block

        cfg = {**DEFAULTS, **{k: v for k, v in config.items() if k in CONFIG_KEYS}}
        self.config = cfg
        ch = list(cfg["block_out_channels"])
        n = len(ch)
        if not (len(cfg["down_block_types"]) == len(cfg["up_block_types"]) == n):
            raise WeightsError(f"refiner config: {n} block_out_channels need as many down and up block types")
        head = cfg["attention_head_dim"]
        common = dict(temb_channels=None, resnet_eps=cfg["norm_eps"], resnet_act_fn=cfg["act_fn"],
                      resnet_groups=cfg["norm_num_groups"], resnet_time_scale_shift="default")
        self.conv_in = nn.Conv2d(cfg["in_channels"], ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        out_c = ch[0]
        for i, kind in enumerate(cfg["down_block_types"]):
            in_c, out_c = out_c, ch[i]
            self.down_blocks.append(get_down_block(
                kind, num_layers=cfg["layers_per_block"], in_channels=in_c, out_channels=out_c,
                add_downsample=i < n - 1, attention_head_dim=head or out_c,
                downsample_padding=cfg["downsample_padding"], downsample_type=cfg["downsample_type"], **common))
        self.mid_block = UNetMidBlock2D(
            in_channels=ch[-1], output_scale_factor=cfg["mid_block_scale_factor"], attention_head_dim=head or ch[-1],
            add_attention=cfg["add_attention"], **common)
        self.up_blocks = nn.ModuleList()
        rev = ch[::-1]
        out_c = rev[0]
        for i, kind in enumerate(cfg["up_block_types"]):
            prev, out_c = out_c, rev[i]
            self.up_blocks.append(get_up_block(
                kind, num_layers=cfg["layers_per_block"] + 1, in_channels=rev[min(i + 1, n - 1)], out_channels=out_c,
                prev_output_channel=prev, add_upsample=i < n - 1, attention_head_dim=head or out_c,
                upsample_type=cfg["upsample_type"], **common))
        self.conv_norm_out = nn.GroupNorm(cfg["norm_num_groups"], ch[0], eps=cfg["norm_eps"])
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[0], cfg["out_channels"], 3, padding=1)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x[:, : self.config["out_channels"]] if self.config["input_residual"] else None
        h = self.conv_in(x)
        res = (h,)
        for block in self.down_blocks:
            h, r = block(hidden_states=h, temb=None)
            res += r
        h = self.mid_block(h, None)
        for block in self.up_blocks:
            k = len(block.resnets)
            h = block(h, res[-k:], None)
            res = res[:-k]
        h = self.conv_out(self.conv_act(self.conv_norm_out(h)))
        return h + skip if skip is not None else h


WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin")


def refiner_folder(path: str | os.PathLike) -> Path:
    """Accept the ``refinement/`` folder itself or the DiffHarmony archive root that contains it."""
    path = Path(path)
    for cand in (path, path / "refinement"):
        if (cand / "config.json").is_file():
            return cand
    raise WeightsError(
        f"no refinement model in {path}: expected config.json + diffusion_pytorch_model.safetensors "
        f"(the DiffHarmony archive's refinement/ folder)"
    )


def load_refiner(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> RefinerUNet:
    folder = refiner_folder(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"cannot read {folder / 'config.json'}: {exc}") from exc
    weights = next((folder / w for w in WEIGHT_NAMES if (folder / w).is_file()), None)
    if weights is None:
        raise WeightsError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_NAMES)}")
    if config.get("in_channels", 7) not in (3, 4, 7):
        raise WeightsError(f"{folder / 'config.json'}: in_channels must be 3, 4 or 7, got {config.get('in_channels')}")
    with empty_weights():
        model = RefinerUNet(**config)
    load_into(model, load_state_dict(weights), str(weights))
    return model.to(dtype).eval().requires_grad_(False)


def refiner_input(harmonized: torch.Tensor, composite: torch.Tensor, mask: torch.Tensor, in_channels: int) -> torch.Tensor:
    """[harmonized, mask, composite] as the official code stacks them; images [B,3,H,W] in [-1,1],
    mask [B,1,H,W] in {0,1}."""
    parts = {3: (harmonized,), 4: (harmonized, mask), 7: (harmonized, mask, composite)}[in_channels]
    return torch.cat(parts, dim=1)


@torch.no_grad()
def refine(model: RefinerUNet, harmonized: torch.Tensor, composite: torch.Tensor, mask: torch.Tensor,
           resolution: int = 256, device: torch.device | str = "cpu", square: bool = False,
           cancel: cancelling.Cancel = None) -> torch.Tensor:
    """Refine a harmonized IMAGE. All inputs are resized to ``resolution`` on the long side, keeping the
    composite's aspect ratio (sides multiples of 16), or to a ``resolution`` square as the official code does
    (``square=True``). Returns an IMAGE at that size; restore.py brings it back to the composite's size.
    ``cancel`` is checked before every block of the refiner UNet."""
    check_refine_resolution(resolution)
    composite, harmonized, mask = images.composite_result_mask(composite, harmonized, mask)
    return refine_unchecked(model, harmonized, composite, mask, resolution, device, square, cancel)


def check_refine_resolution(resolution: int) -> None:
    if resolution % 16 or resolution < 16:
        raise InputError(f"refine resolution must be a positive multiple of 16, got {resolution}")


@torch.no_grad()
def refine_unchecked(model: RefinerUNet, harmonized: torch.Tensor, composite: torch.Tensor, mask: torch.Tensor,
                     resolution: int = 256, device: torch.device | str = "cpu", square: bool = False,
                     cancel: cancelling.Cancel = None) -> torch.Tensor:
    """:func:`refine` on inputs already checked (``images.composite_result_mask``, the resolution)."""
    size = images.fit_size(composite.shape[1], composite.shape[2], resolution, multiple=16, square=square)
    dtype = next(model.parameters()).dtype
    h = images.to_signed(images.resize_images(harmonized, size))
    c = images.to_signed(images.resize_images(composite, size))
    m = (images.resize_masks(mask, size) >= 0.5).float()[:, None]
    x = refiner_input(h, c, m, model.config["in_channels"]).to(device=device, dtype=dtype)
    with cancelling.inside(model, cancel):
        out = model(x).clamp(-1, 1)
    return images.from_signed(out)


def is_refiner_folder(folder: Path) -> bool:
    """A refinement model folder: a config.json whose down blocks are all DownBlock2D, weights beside it,
    and not a component of a diffusers pipeline (unet/, vae/ ... under a model_index.json)."""
    cfg = folder / "config.json"
    if not cfg.is_file() or any((p / "model_index.json").is_file() for p in (folder, folder.parent)):
        return False
    if not any((folder / w).is_file() for w in WEIGHT_NAMES):
        return False
    try:
        blocks = json.loads(cfg.read_text()).get("down_block_types", [])
    except (OSError, json.JSONDecodeError):
        return False
    return bool(blocks) and all(b == "DownBlock2D" for b in blocks)


def _is_pipeline_folder(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def find_refiners(roots) -> dict[str, Path]:
    """Refinement models under ``roots`` (see :func:`is_refiner_folder`), e.g. ``<archive>/refinement``."""
    return model_files.find(roots, model_dir=is_refiner_folder, skip_dir=_is_pipeline_folder)
