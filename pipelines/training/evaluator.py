"""Train the harmony evaluator (ResNet-50 over RGB + mask, 2 classes) of the zero-shot method.

    accelerate launch -m comfyui_harmonize.pipelines.training.evaluator --data /data/iHarmony4 \\
        --out runs/evaluator [--scores scores.csv] [--init resnet50_imagenet.pth]

Labels: iHarmony4 composites are 0 (inharmonious) and their real images 1 (harmonious), each with the
composite's mask as the 4th channel. ``--scores`` adds images with soft labels, as the paper trained on
human-rated results: a CSV with the columns ``image,mask,score`` (paths relative to the CSV's folder or
absolute; score in [0, 1]); the loss is the cross-entropy to ``[1 - score, score]``. Inputs are prepared
exactly as the evaluator prepares them at scoring time (256x256, RGB normalised with mean/std 0.5, mask in
0..1), with random horizontal flips.

``--init`` starts from a torchvision-layout ResNet state dict: a 3-channel first convolution (ImageNet
weights) gets a zero-initialised mask channel, and a classifier with other than 2 outputs is re-initialised.

The final model is ``<out>/final/harmony_evaluator.safetensors``; put it in ``models/harmony_evaluator``.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..evaluation import evaluator as ev
from ..ihd import dataset as ihd
from ..core import image_io
from ..core.errors import InputError, WeightsError

from ..core.weights import check_keys, load_state_dict

FILE_NAME = "harmony_evaluator.safetensors"


class ScoredImages(torch.utils.data.Dataset):
    """(image, mask, score) items -> ``{"x": [4,S,S], "score": float, "name": str}``."""

    def __init__(self, items: list[tuple[Path, Path, float]], size: int = ev.INPUT_SIZE, flip: bool = True,
                 seed: int = 0):
        if not items:
            raise InputError("the evaluator's training set is empty")
        for path, mask, score in items:
            if not 0.0 <= score <= 1.0:
                raise InputError(f"score of {path} is {score}; scores must be in [0, 1]")
        self.items = list(items)
        self.size = int(size)
        self.flip = flip
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, mask_path, score = self.items[index]
        image = image_io.load_image(path)
        mask = image_io.load_mask(mask_path)
        if mask.shape[-2:] != image.shape[1:3]:
            raise InputError(f"{mask_path} is {tuple(mask.shape[-2:])} but {path} is {tuple(image.shape[1:3])}")
        x = ev.preprocess(image, mask, self.size)[0]
        name = f"{path}"
        g = torch.Generator().manual_seed(ihd.name_seed(name, self.seed * 1000003 + self.epoch))
        if self.flip and float(torch.rand(1, generator=g)) < 0.5:
            x = x.flip(-1)
        return {"x": x, "score": torch.tensor(float(score)), "name": name}


def ihd_items(root, subsets=None) -> list[tuple[Path, Path, float]]:
    """Composites (0) and their real images (1) of the iHarmony4 train split."""
    items = []
    for s in ihd.list_split(root, "train", subsets):
        items.append((s.composite, s.mask, 0.0))
        items.append((s.real, s.mask, 1.0))
    return items


def csv_items(path) -> list[tuple[Path, Path, float]]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"scores file not found: {path}")
    base = path.parent
    items = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"image", "mask", "score"}
        if not need <= set(reader.fieldnames or ()):
            raise InputError(f"{path} must have the columns image,mask,score; found {reader.fieldnames}")
        for i, row in enumerate(reader, start=2):
            try:
                score = float(row["score"])
            except ValueError:
                raise InputError(f"{path} line {i}: score {row['score']!r} is not a number") from None
            image, mask = base / row["image"], base / row["mask"]
            for p in (image, mask):
                if not p.is_file():
                    raise InputError(f"{path} line {i}: file not found: {p}")
            items.append((image, mask, score))
    return items


def init_from(model: ev.ResNet, path) -> ev.ResNet:
    """Copy a torchvision-layout state dict into ``model``, adapting the stem and the classifier."""
    sd = ev.to_torchvision_layout(load_state_dict(path))
    cfg = ev.infer_config(sd, str(path))
    if tuple(cfg["layers"]) != model.layers_config or cfg["base_width"] != model.base_width:
        raise WeightsError(f"{path} is a ResNet {cfg['layers']} (width {cfg['base_width']}); the model being "
                           f"trained is {list(model.layers_config)} (width {model.base_width})")
    own = model.state_dict()
    conv1 = sd["conv1.weight"]
    if conv1.shape[1] == 3:
        conv1 = torch.cat([conv1, torch.zeros_like(conv1[:, :1])], dim=1)  # the mask channel starts at zero
    sd["conv1.weight"] = conv1
    if tuple(sd["fc.weight"].shape) != tuple(own["fc.weight"].shape):
        sd["fc.weight"], sd["fc.bias"] = own["fc.weight"], own["fc.bias"]
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = v
    check_keys(own, sd, str(path), "the model being trained", unexpected_ok=True)
    model.load_state_dict({k: sd[k].to(own[k].dtype) for k in own}, strict=True)
    return model


class EvaluatorTask:
    """Cross-entropy of the 2-class classifier to (soft) labels [1 - score, score]."""

    def __init__(self, model: ev.ResNet, size: int = ev.INPUT_SIZE):
        self.model = model.train().requires_grad_(True)
        self.size = size

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        self.device = device
        self.model.to(device)

    def enable_gradient_checkpointing(self) -> None:
        self.model.gradient_checkpointing = True

    def loss(self, model, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        x = batch["x"].to(self.device)
        s = batch["score"].to(self.device, dtype=torch.float32)
        logits = model(x).float()
        return F.cross_entropy(logits, torch.stack([1 - s, s], dim=1))

    def export(self, folder: Path, model) -> None:
        folder.mkdir(parents=True, exist_ok=False)
        was_training = model.training
        model.eval()
        ev.save_evaluator(model, folder / FILE_NAME, size=self.size)
        model.train(was_training)


def build(args: argparse.Namespace):
    if not args.data and not args.scores:
        raise InputError("give --data (iHarmony4 composites vs real images) and/or --scores (a CSV of soft labels)")
    try:
        layers = tuple(int(n) for n in args.layers.split(","))
    except ValueError:
        raise InputError(f"--layers must be 4 comma-separated integers, got {args.layers!r}") from None
    if len(layers) != 4 or min(layers) < 1:
        raise InputError(f"--layers must be 4 positive integers, got {args.layers!r}")
    torch.manual_seed(args.seed)
    model = ev.ResNet(layers, in_channels=4, num_classes=2, base_width=args.base_width)
    if args.init:
        init_from(model, args.init)
    items = (ihd_items(args.data, args.subsets) if args.data else []) + (csv_items(args.scores) if args.scores else [])
    dataset = ScoredImages(items, size=args.size, flip=not args.no_flip, seed=args.seed)
    return EvaluatorTask(model, args.size), dataset


if __name__ == "__main__":
    print("the training commands moved: run `harmonize-train-evaluator` or "
          "`python -m comfyui_harmonize.commands.train evaluator ...`", file=sys.stderr)
    sys.exit(2)
