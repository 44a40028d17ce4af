"""Harmony evaluator of the zero-shot method (reference/zero_shot.md, "Evaluator").

A ResNet-50 two-class classifier over RGB + mask: the first convolution takes 4 channels, the image is
resized to 256x256 and normalised with mean 0.5 / std 0.5, the mask (0..1, not normalised) is the 4th
channel, and the score is ``softmax(logits)[:, 1]`` = the probability of "harmonious".

Written in plain torch (no torchvision). Weights load from:

- a torchvision-layout state dict (``conv1``, ``bn1``, ``layer1``..``layer4``, ``fc``; ``conv1`` with 4
  input channels) in ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``) or ``.safetensors``;
  ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and a ``module.`` prefix are accepted;
- the layout of the official code's classifier (``inp_encoder``, ``encoder.0`` = bn1, ``encoder.3``..
  ``encoder.6`` = layer1..4, ``classify_fc``), should its weights ever be published;
- this module's own safetensors (torchvision layout + metadata), written by ``save_evaluator``.

The number of bottleneck blocks per stage is read from the weights ([3,4,6,3] for ResNet-50; ResNet-101/152
load too).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..core import images, model_files
from ..core.errors import InputError, WeightsError
from ..core.weights import check_keys, empty_weights, load_state_dict

RESNET50_LAYERS = (3, 4, 6, 3)
INPUT_SIZE = 256
MEAN, STD = 0.5, 0.5
FORMAT = "harmony_evaluator"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 convolution), torchvision parameter names."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with bottleneck blocks; ``in_channels=4`` takes RGB + mask."""

    def __init__(self, layers=RESNET50_LAYERS, in_channels: int = 4, num_classes: int = 2, base_width: int = 64):
        super().__init__()
        self.layers_config = tuple(int(n) for n in layers)
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.base_width = int(base_width)
        self.gradient_checkpointing = False
        self.conv1 = nn.Conv2d(in_channels, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        ch = base_width
        for i, n in enumerate(self.layers_config):
            width = base_width * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(ch, width, stride=2 if (j == 0 and i > 0) else 1))
                ch = width * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal convolutions, unit BatchNorm, last BN of each block zeroed (a block starts as identity)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def stages(self):
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.layers_config))]

    def config(self) -> dict:
        return {"arch": "resnet_bottleneck", "layers": list(self.layers_config), "in_channels": self.in_channels,
                "num_classes": self.num_classes, "base_width": self.base_width}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages():
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(in_channels: int = 4, num_classes: int = 2) -> ResNet:
    return ResNet(RESNET50_LAYERS, in_channels, num_classes)


# ----------------------------------------------------------------------------------- state dicts
_OFFICIAL = [(re.compile(r"^inp_encoder\."), "conv1."), (re.compile(r"^encoder\.0\."), "bn1."),
             (re.compile(r"^encoder\.([3-6])\."), None), (re.compile(r"^classify_fc\."), "fc.")]


def to_torchvision_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unwrap ``state_dict``/``model`` containers, strip ``module.``, map the official classifier's names."""
    for key in ("state_dict", "model", "model_state_dict"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith("inp_encoder.") for k in sd):
        mapped = {}
        for k, v in sd.items():
            for pat, repl in _OFFICIAL:
                m = pat.match(k)
                if m:
                    new = f"layer{int(m.group(1)) - 2}." if repl is None else repl
                    k = new + k[m.end():]
                    break
            mapped[k] = v
        sd = mapped
    return sd


def infer_config(sd: dict[str, torch.Tensor], source: str) -> dict:
    """Block counts, input channels and classes from a torchvision-layout state dict."""
    if "conv1.weight" not in sd or "fc.weight" not in sd:
        raise WeightsError(f"{source} is not a ResNet state dict: expected conv1.weight and fc.weight "
                           f"(torchvision layout), found keys like {', '.join(list(sd)[:4]) or 'none'}")
    layers = []
    for i in range(1, 5):
        idx = {int(m.group(1)) for k in sd for m in [re.match(rf"^layer{i}\.(\d+)\.", k)] if m}
        if not idx:
            break
        layers.append(max(idx) + 1)
    if len(layers) != 4:
        raise WeightsError(f"{source}: expected layer1..layer4 in the state dict, found {len(layers)} stages")
    if "layer1.0.conv3.weight" not in sd:
        raise WeightsError(f"{source}: the blocks have no conv3, so this is a basic-block ResNet (18/34); the "
                           f"evaluator is a bottleneck ResNet (ResNet-50)")
    conv1 = sd["conv1.weight"]
    return {"layers": layers, "in_channels": int(conv1.shape[1]), "num_classes": int(sd["fc.weight"].shape[0]),
            "base_width": int(conv1.shape[0])}


def build_from_state_dict(sd: dict[str, torch.Tensor], source: str) -> ResNet:
    sd = to_torchvision_layout(sd)
    cfg = infer_config(sd, source)
    if cfg["in_channels"] != 4:
        raise WeightsError(f"{source}: the first convolution takes {cfg['in_channels']} channels; the harmony "
                           f"evaluator takes 4 (RGB + mask)")
    if cfg["num_classes"] != 2:
        raise WeightsError(f"{source}: the classifier has {cfg['num_classes']} outputs; the harmony evaluator "
                           f"has 2 (inharmonious, harmonious)")
    with empty_weights():  # parameters are filled from the file: skip allocating and initialising them
        model = ResNet(cfg["layers"], cfg["in_channels"], cfg["num_classes"], cfg["base_width"])
    own = model.state_dict()
    # BatchNorm's num_batches_tracked is bookkeeping only; older or converted files may lack it.
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = v
    check_keys(own, sd, source, f"a ResNet {cfg['layers']}")
    model.load_state_dict({k: sd[k].to(own[k].dtype).contiguous() for k in own}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------- the evaluator
def preprocess(images_bhwc: torch.Tensor, masks: torch.Tensor, size: int = INPUT_SIZE,
               antialias: bool = False) -> torch.Tensor:
    """IMAGE ``[B,H,W,3]`` + MASK ``[B,H,W]`` -> network input ``[B,4,size,size]``.

    Bilinear resize to a square (the official code uses OpenCV's INTER_LINEAR, i.e. no antialiasing;
    ``antialias=True`` filters large downscales); RGB -> (x - 0.5) / 0.5, mask kept in 0..1."""
    image, mask = images.image_and_mask(images_bhwc, masks)
    x = images.to_nchw(image)
    m = mask[:, None]
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
        m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
    return torch.cat([(x - MEAN) / STD, m.clamp(0, 1)], dim=1)


class HarmonyEvaluator:
    """``evaluator(images [B,H,W,3], masks [B,H,W]) -> scores [B]`` (float32, CPU): P(harmonious).

    ``to_device``: optional ``callable(model) -> device`` run before each call (the nodes pass ComfyUI's
    model management here); otherwise the model runs where its weights are.
    """

    def __init__(self, model: ResNet, size: int = INPUT_SIZE, antialias: bool = False, source: str = "",
                 to_device: Callable[[nn.Module], torch.device] | None = None, batch_size: int = 16):
        self.model = model.eval()
        self.size = int(size)
        self.antialias = antialias
        self.source = source
        self.to_device = to_device
        self.batch_size = max(1, int(batch_size))

    @torch.no_grad()
    def logits(self, images_bhwc: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        x = preprocess(images_bhwc, masks, self.size, self.antialias)
        if self.to_device is not None:
            device = self.to_device(self.model)
        else:
            device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        out = [self.model(chunk.to(device=device, dtype=dtype)).float().cpu()
               for chunk in x.split(self.batch_size)]
        return torch.cat(out)

    def __call__(self, images_bhwc: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(images_bhwc, masks), dim=1)[:, 1]

    def __repr__(self) -> str:
        return f"HarmonyEvaluator(ResNet {list(self.model.layers_config)}, {self.size}px, {self.source or 'unsaved'})"


def load_evaluator(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> HarmonyEvaluator:
    """Load a harmony evaluator from ``.safetensors`` or a ``.pth``/``.pt`` state dict (never unpickling
    objects); see the module docstring for the accepted layouts."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"harmony evaluator weights not found: {path} (expected a .safetensors or .pth file)")
    if not path.name.lower().endswith(WEIGHT_SUFFIXES):
        raise WeightsError(f"{path}: expected a .safetensors, .pth, .pt, .bin or .ckpt file")
    sd = load_state_dict(path)
    size = INPUT_SIZE
    if path.suffix.lower() == ".safetensors":
        meta = read_metadata(path)
        if meta.get("input_size"):
            size = int(meta["input_size"])
    model = build_from_state_dict(sd, str(path))
    return HarmonyEvaluator(model.to(dtype), size=size, source=str(path))


def read_metadata(path: str | os.PathLike) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise WeightsError(f"could not read {path}: {exc}") from exc


def save_evaluator(model: ResNet, path: str | os.PathLike, size: int = INPUT_SIZE, extra: dict | None = None) -> Path:
    """Write the model as torchvision-layout safetensors with metadata; never overwrites a file."""

    path = Path(path)
    if path.exists():
        raise InputError(f"{path} already exists; choose another file name (existing files are never overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "config": json.dumps(model.config()), "input_size": str(int(size)),
            "normalization": "rgb (x-0.5)/0.5, mask 0..1", "score": "softmax(logits)[:, 1]"}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=meta)
    return path


def find_evaluators(roots) -> dict[str, Path]:
    """Weight files under ``roots`` (names relative to their root)."""
    return model_files.find(roots, file_suffixes=WEIGHT_SUFFIXES)
