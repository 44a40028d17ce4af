"""PiDiNet edge detector (Su et al., "Pixel Difference Networks for Efficient Edge Detection", ICCV 2021)
in plain torch, loading the checkpoints its authors publish.

Published checkpoints (the ``table5_pidinet*.pth`` family) are ``{"epoch": int, "state_dict": {...}}`` with
every key prefixed ``module.`` (saved from ``DataParallel``). All of them use the "carv4" layer
configuration; the variant is read from the weight shapes:

=================  =======  =====================  ==============================
file               inplane  dilation module (dil)  spatial attention (sa)
=================  =======  =====================  ==============================
table5_pidinet       60        24 channels            yes
table5_pidinet-small 30        12 channels            yes
table5_pidinet-tiny  20         8 channels            yes
``*-l`` ("lite")     60/30/20   none                  no
=================  =======  =====================  ==============================

Architecture facts (from the paper and the authors' public code):

- 16 pixel-difference layers: the stem (3 -> C) and 15 depthwise 3x3 layers in four stages of C, 2C, 4C,
  4C channels; stages 2-4 start with a 2x2 max-pool and a 1x1 shortcut convolution (with bias). Each block
  is ``x + conv1x1(relu(pdc(x)))``.
- "carv4" repeats (central, angular, radial, vanilla) four times over the 16 layers.
- Central difference (CPDC): ``sum_i w_i (x_i - x_center)`` over the 3x3 window.
- Angular difference (APDC): ``sum_i w_i (x_i - x_next(i))`` over the 8 ring positions of the 3x3 window,
  ``next`` being the clockwise neighbour on the ring (the centre weight is unused).
- Radial difference (RPDC): a 5x5 window, ``sum_d w_d (x_outer(d) - x_inner(d))`` over the 8 directions
  (raster order of the outer ring positions). In the published checkpoints the 8 radial weights are the 3x3
  kernel entries at raster positions 1..8 (position 0 is unused): that is how they were trained.
- Every pixel-difference operation is linear in the kernel, so it is computed here as an ordinary
  convolution with a kernel derived from the learned weights (a fixed linear map). That is exact, fast, and
  differentiable with respect to both the input image and the weights.
- Side outputs per stage: (optional) CDCM (ReLU, 1x1 conv to ``dil`` channels, four 3x3 convolutions with
  dilations 5, 7, 9, 11, summed) -> (optional) CSAM (``x * sigmoid(conv3x3(conv1x1(relu(x))))`` with 4
  hidden channels) -> 1x1 conv to one channel -> bilinear upsampling to the input size. A 1x1 convolution
  fuses the four side maps; the edge probability is the sigmoid of the fused map.
- Input: RGB in [0, 1] normalised with the ImageNet mean/std (done inside :meth:`PiDiNet.forward`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core import model_files
from ..core import model_files
from ..core.errors import WeightsError
from ..core.weights import PICKLE_SUFFIXES, SAFE_SUFFIXES, empty_weights, load_into, load_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Layer operations of the "carv4" configuration, layer 0 (stem) to layer 15.
CARV4 = ("cd", "ad", "rd", "cv") * 4

VARIANT_NAMES = {60: "full", 30: "small", 20: "tiny"}
VARIANT_INPLANES = {name: c for c, name in VARIANT_NAMES.items()}
DEFAULT_DIL = {60: 24, 30: 12, 20: 8}  # the authors' dilation-module widths per variant

CHECKPOINT_SUFFIXES = SAFE_SUFFIXES + PICKLE_SUFFIXES

# 3x3 ring in clockwise order, as raster indices of the 3x3 window (0 1 2 / 3 4 5 / 6 7 8).
_RING_CLOCKWISE = (0, 1, 2, 5, 8, 7, 6, 3)
# Radial directions: (outer position, inner position) in the 5x5 window, raster order of the outer ring.
_RADIAL = (((0, 0), (1, 1)), ((0, 2), (1, 2)), ((0, 4), (1, 3)), ((2, 0), (2, 1)),
           ((2, 4), (2, 3)), ((4, 0), (3, 1)), ((4, 2), (3, 2)), ((4, 4), (3, 3)))


def difference_map(op: str) -> torch.Tensor | None:
    """The fixed linear map ``M`` with ``kernel = weight3x3.flatten() @ M`` for a pixel-difference op:
    ``[9, 9]`` for cd/ad (3x3 kernel), ``[9, 25]`` for rd (5x5 kernel); None for a vanilla convolution."""
    if op == "cv":
        return None
    if op == "cd":  # w_i * x_i for every i, minus (sum_i w_i) * x_center
        m = torch.eye(9)
        m[:, 4] -= 1.0
        return m
    if op == "ad":  # w_i * (x_i - x_next(i)) on the ring
        m = torch.zeros(9, 9)
        for k, i in enumerate(_RING_CLOCKWISE):
            j = _RING_CLOCKWISE[(k + 1) % 8]
            m[i, i] += 1.0
            m[i, j] -= 1.0
        return m
    if op == "rd":  # w_(d+1) * (x_outer(d) - x_inner(d)) on the 5x5 window
        m = torch.zeros(9, 25)
        for d, ((oy, ox), (iy, ix)) in enumerate(_RADIAL):
            m[d + 1, oy * 5 + ox] += 1.0
            m[d + 1, iy * 5 + ix] -= 1.0
        return m
    raise ValueError(f"unknown pixel-difference operation {op!r} (expected cv, cd, ad or rd)")


class PixelDifferenceConv(nn.Module):
    """3x3 pixel-difference convolution (stride 1, "same" size, no bias). ``weight`` holds the learned 3x3
    kernel exactly as in the published checkpoints."""

    def __init__(self, op: str, in_channels: int, out_channels: int, groups: int = 1):
        super().__init__()
        self.op = op
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        m = difference_map(op)
        self.kernel_size = 3 if m is None else int(round(m.shape[1] ** 0.5))
        if m is not None:
            self.register_buffer("diff_map", m, persistent=False)
        else:
            self.diff_map = None

    def kernel(self) -> torch.Tensor:
        """The equivalent ordinary convolution kernel (3x3, or 5x5 for rd)."""
        if self.diff_map is None:
            return self.weight
        o, i = self.weight.shape[:2]
        k = self.weight.reshape(o, i, 9) @ self.diff_map.to(self.weight.dtype)
        return k.reshape(o, i, self.kernel_size, self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel(), padding=self.kernel_size // 2, groups=self.groups)

    def extra_repr(self) -> str:
        o, i = self.weight.shape[:2]
        return f"op={self.op}, {i * self.groups}->{o}, groups={self.groups}"


class PDCBlock(nn.Module):
    """``x + conv1x1(relu(pdc_depthwise(x)))``; with ``downsample``: max-pool 2x2 first and a 1x1 shortcut."""

    def __init__(self, op: str, in_channels: int, out_channels: int, downsample: bool = False):
        super().__init__()
        self.downsample = downsample
        if downsample:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1)
        self.conv1 = PixelDifferenceConv(op, in_channels, in_channels, groups=in_channels)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            x = F.max_pool2d(x, 2, 2)
        y = self.conv2(F.relu(self.conv1(x)))
        return y + (self.shortcut(x) if self.downsample else x)


class CDCM(nn.Module):
    """Compact dilation convolution module: 1x1 reduction then four dilated 3x3 convolutions, summed."""

    DILATIONS = (5, 7, 9, 11)

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 1)
        nn.init.zeros_(self.conv1.bias)
        for n, d in enumerate(self.DILATIONS, start=1):
            setattr(self, f"conv2_{n}", nn.Conv2d(channels, channels, 3, padding=d, dilation=d, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.relu(x))
        return sum(getattr(self, f"conv2_{n}")(x) for n in range(1, len(self.DILATIONS) + 1))


class CSAM(nn.Module):
    """Compact spatial attention module: ``x * sigmoid(conv3x3(conv1x1(relu(x))))``."""

    def __init__(self, channels: int, hidden: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, 1, 3, padding=1, bias=False)
        nn.init.zeros_(self.conv1.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv2(self.conv1(F.relu(x))))


class MapReduce(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PiDiNet(nn.Module):
    """PiDiNet with the published parameter names (without the ``module.`` prefix).

    ``forward(image)`` takes RGB ``[B,3,H,W]`` in [0, 1] (any H, W) and returns the fused edge probability
    ``[B,1,H,W]`` in (0, 1). Gradients flow to the input image.
    """

    def __init__(self, inplane: int = 60, dil: int | None = 24, sa: bool = True, ops: tuple[str, ...] = CARV4):
        super().__init__()
        if len(ops) != 16:
            raise ValueError(f"PiDiNet needs 16 layer operations, got {len(ops)}")
        self.inplane, self.dil, self.sa, self.ops = inplane, dil, sa, tuple(ops)
        c = inplane
        self.init_block = PixelDifferenceConv(ops[0], 3, c)
        widths = (c, 2 * c, 4 * c, 4 * c)
        layer = 1
        in_ch = c
        for stage, width in enumerate(widths, start=1):
            for b in range(1, (3 if stage == 1 else 4) + 1):
                down = stage > 1 and b == 1
                setattr(self, f"block{stage}_{b}", PDCBlock(ops[layer], in_ch, width, downsample=down))
                in_ch = width
                layer += 1
        if dil is not None:
            self.dilations = nn.ModuleList(CDCM(w, dil) for w in widths)
        side = [dil if dil is not None else w for w in widths]
        if sa:
            self.attentions = nn.ModuleList(CSAM(s) for s in side)
        self.conv_reduces = nn.ModuleList(MapReduce(s) for s in side)
        self.classifier = nn.Conv2d(4, 1, 1)
        nn.init.constant_(self.classifier.weight, 0.25)
        nn.init.zeros_(self.classifier.bias)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # Memory format of the features: None = channels-last on the CPU (its depthwise convolutions run
        # faster that way: forward about 1.2-1.5x at 512 px, see benchmarks/pidinet_speed.py), the input's
        # own format elsewhere.
        self.channels_last: bool | None = None

    @property
    def variant(self) -> str:
        """"tiny", "small", "full"; "-l" appended for the lite versions without CDCM and CSAM."""
        name = VARIANT_NAMES.get(self.inplane, f"inplane-{self.inplane}")
        if self.sa and self.dil is not None:
            return name
        if not self.sa and self.dil is None:
            return f"{name}-l"
        return f"{name} (sa={self.sa}, dil={self.dil})"

    def _stage_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.init_block(x)
        feats = []
        for stage, n in ((1, 3), (2, 4), (3, 4), (4, 4)):
            for b in range(1, n + 1):
                x = getattr(self, f"block{stage}_{b}")(x)
            feats.append(x)
        return feats

    def side_logits(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The four side-output logits and the fused logit, each ``[B,1,H,W]`` at the input size."""
        h, w = image.shape[-2:]
        x = (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)
        if self.channels_last or (self.channels_last is None and x.device.type == "cpu"):
            x = x.contiguous(memory_format=torch.channels_last)
        sides = []
        for i, f in enumerate(self._stage_features(x)):
            if self.dil is not None:
                f = self.dilations[i](f)
            if self.sa:
                f = self.attentions[i](f)
            e = self.conv_reduces[i](f)
            sides.append(F.interpolate(e, size=(h, w), mode="bilinear", align_corners=False))
        fused = self.classifier(torch.cat(sides, dim=1))
        return sides + [fused]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"PiDiNet expects RGB images [B,3,H,W] in [0,1], got shape {tuple(image.shape)}")
        return torch.sigmoid(self.side_logits(image)[-1])


# ------------------------------------------------------------------------------------------ loading
def _unwrap(obj: dict, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a PiDiNet checkpoint, without the ``state_dict`` wrapper and ``module.`` prefixes."""
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict):
        raise WeightsError(f"{source} is not a PiDiNet checkpoint: its 'state_dict' is a {type(sd).__name__}")
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    if "init_block.weight" not in tensors or "classifier.weight" not in tensors:
        keys = ", ".join(list(sd)[:5]) or "none"
        raise WeightsError(
            f"{source} is not a PiDiNet checkpoint: expected the published layout ({{'epoch', 'state_dict'}} "
            f"with keys such as 'module.init_block.weight' and 'module.classifier.weight'), found keys: {keys}"
        )
    return tensors


def config_from_state_dict(sd: dict[str, torch.Tensor], source: str = "state dict") -> dict:
    """``{"inplane", "dil", "sa"}`` read from the weight shapes (keys without ``module.``)."""
    stem = sd["init_block.weight"]
    if stem.dim() != 4 or tuple(stem.shape[1:]) != (3, 3, 3):
        raise WeightsError(
            f"{source}: init_block.weight has shape {tuple(stem.shape)}, expected [C, 3, 3, 3] (an unconverted "
            f"PiDiNet checkpoint, as published)"
        )
    dil = sd.get("dilations.0.conv1.weight")
    return {
        "inplane": int(stem.shape[0]),
        "dil": None if dil is None else int(dil.shape[0]),
        "sa": "attentions.0.conv1.weight" in sd,
    }


def pidinet_from_state_dict(state: dict, source: str = "state dict") -> PiDiNet:
    """Build the PiDiNet the weights describe and load them strictly; eval mode, parameters frozen
    (gradients still flow to the input image)."""
    sd = _unwrap(state, source)
    cfg = config_from_state_dict(sd, source)
    with empty_weights():
        model = PiDiNet(**cfg)
    load_into(model, {k: v.float() for k, v in sd.items()}, source)
    return model.eval().requires_grad_(False)


def load_pidinet(path: str | os.PathLike) -> PiDiNet:
    """Load a published PiDiNet checkpoint (``.pth`` read with ``weights_only=True``, or ``.safetensors``)."""
    path = os.fspath(path)
    return pidinet_from_state_dict(load_state_dict(path), source=path)


# ------------------------------------------------------------------------------------ model folders
def find_checkpoints(roots: list[str | os.PathLike]) -> dict[str, Path]:
    """Checkpoint files under ``roots`` (recursively), by path relative to their root."""
    return model_files.find(roots, file_suffixes=CHECKPOINT_SUFFIXES)


def resolve_checkpoint(name: str, roots: list[str | os.PathLike]) -> Path:
    """The file called ``name`` in one of ``roots``; a clear error naming the folders otherwise."""
    return model_files.resolve(name, find_checkpoints(roots), "PiDiNet checkpoint", roots,
                               "a published PiDiNet checkpoint such as table5_pidinet.pth or "
                               "table5_pidinet-tiny.pth in one of those folders")
