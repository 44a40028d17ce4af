"""Train DiffHarmony's residual refinement UNet on DiffHarmony outputs.

    accelerate launch -m comfyui_harmonize.pipelines.training.refiner --data /data/iHarmony4 \\
        --diffharmony models/diffharmony/DiffHarmony --out runs/refiner --config base

As the reference describes it (reference/diffharmony.md, "Refinement stage"): a frozen DiffHarmony generates
the harmonized image on the fly (512px square crops, Euler-ancestral, 5 steps, empty prompt); the refiner
sees ``concat([harmonized, mask, composite])`` at 256x256 in [-1, 1] (the harmonized image downscaled with
antialiasing), adds its output to the harmonized channels, and is trained with the MSE to the real image at
256 over the whole image; AdamW lr 1e-4, weight decay 1e-2, gradient clipping 1.0, EMA 0.9999.

Instead of generating on the fly, ``--cache DIR`` reads ``DIR/<name>.png`` (for instance the images of
``benchmark --split train --save-images --no-refine``): much faster per step, at the cost of one fixed
DiffHarmony sample per composite.

The final model (``<out>/final``) is a ``refinement/`` folder (config.json + diffusion_pytorch_model.safetensors)
that the pack's refiner loader reads.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..ihd import dataset as ihd
from ..core.errors import InputError
from ..diffharmony import pipeline as dh
from ..diffharmony.refiner import DEFAULTS, RefinerUNet, load_refiner, refiner_input


# Published configurations of the refinement UNet (block_out_channels); training used "base".
PRESETS = {"small": [64, 128, 256, 256], "base": [128, 256, 512, 512], "large": [256, 512, 1024, 1024]}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def refiner_config(preset_or_path: str, in_channels: int = 7) -> dict:
    """A full refiner config from a preset name or a config.json."""
    if preset_or_path in PRESETS:
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in DEFAULTS.items()}
        cfg.update(block_out_channels=PRESETS[preset_or_path], in_channels=in_channels)
        return cfg
    path = Path(preset_or_path)
    if not path.is_file():
        raise InputError(f"--config must be one of {', '.join(PRESETS)} or a config.json file, got {preset_or_path!r}")
    return json.loads(path.read_text())


def save_refiner(model: RefinerUNet, folder: Path) -> Path:
    """config.json + diffusion_pytorch_model.safetensors, the layout of the released ``refinement/``."""

    folder.mkdir(parents=True, exist_ok=False)
    cfg = {"_class_name": "UNet2DCustom",
           **{k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items()}}
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    sd = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    return folder


def enable_block_checkpointing(model: torch.nn.Module) -> None:
    """Gradient checkpointing in the diffusers blocks the refiner is built from."""
    func = functools.partial(_checkpoint)
    for m in model.modules():
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = True
            m._gradient_checkpointing_func = func


def _checkpoint(module, *args):
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


class RefinerTask:
    """MSE between the refined image and the real image at the refinement resolution."""

    def __init__(self, model: RefinerUNet, diffharmony=None, refine_resolution: int = 256,
                 gen_resolution: int = 512, gen_steps: int = 5, gen_scheduler: str = "euler_ancestral"):
        if refine_resolution % 16:
            raise InputError(f"--refine-resolution must be a multiple of 16, got {refine_resolution}")
        self.model = model.train().requires_grad_(True)
        self.sd = diffharmony
        if self.sd is not None:
            for m in self.sd.modules().values():
                m.requires_grad_(False).eval()
        self.refine_resolution = refine_resolution
        self.device = torch.device("cpu")  # until setup() moves everything to the training device
        self.gen_resolution = gen_resolution
        self.gen_steps = gen_steps
        self.gen_scheduler = gen_scheduler

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        self.device = device
        self.model.to(device)
        if self.sd is not None:
            for m in self.sd.modules().values():
                m.to(device, dtype=weight_dtype)

    def enable_gradient_checkpointing(self) -> None:
        enable_block_checkpointing(self.model)

    @torch.no_grad()
    def harmonize(self, comp: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
        """DiffHarmony on a batch of crops (``comp`` [-1,1] ``[B,3,H,W]``, mask ``[B,1,H,W]``) -> [-1,1]."""

        image = ((comp.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()
        latents = dh.encode(self.sd, image, self.gen_resolution, seed, square=True)
        m = dh.latent_mask(mask[:, 0].float().cpu(), latents.shape[-2:])
        out = dh.sample(self.sd, latents, m, seed, self.gen_steps, self.gen_scheduler)
        return dh.decode(self.sd, out).permute(0, 3, 1, 2) * 2 - 1

    def inputs(self, batch: dict, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        comp, real, mask = batch["comp"].float(), batch["real"].float(), batch["mask"].float()
        if "harm" in batch:
            harm = batch["harm"].float()
        elif self.sd is not None:
            if generator is None:
                seed = int(torch.randint(0, 2**62, (1,)))
            else:
                seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            harm = self.harmonize(comp, mask, seed)
        else:
            raise InputError("no harmonized input: give a DiffHarmony model (--diffharmony) or a --cache folder")
        r = (self.refine_resolution, self.refine_resolution)

        def down(x):
            x = x.to(self.device)
            if tuple(x.shape[-2:]) == r:
                return x
            return F.interpolate(x, size=r, mode="bilinear", align_corners=False, antialias=True).clamp(-1, 1)

        m = down(mask)
        m = (m >= 0.5).float()
        x = refiner_input(down(harm), down(comp), m, self.model.config["in_channels"])
        return x, down(real)

    def loss(self, model, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        x, target = self.inputs(batch, generator)
        return F.mse_loss(model(x).float(), target.float())

    def export(self, folder: Path, model) -> None:
        save_refiner(model, folder)


def build(args: argparse.Namespace):
    if not args.diffharmony and not args.cache:
        raise InputError("give --diffharmony (generate inputs on the fly) or --cache (pre-generated results)")
    if args.init:
        model = load_refiner(args.init)
    else:
        torch.manual_seed(args.seed)
        model = RefinerUNet(**refiner_config(args.config, args.in_channels))
    sd = None
    if not args.cache:
        sd = dh.load_diffharmony(args.diffharmony, dtype=torch.float32, tokenizer_dir=args.tokenizer)
    task = RefinerTask(model, sd, args.refine_resolution, args.resolution, args.gen_steps, args.gen_scheduler)
    samples = ihd.list_split(args.data, "train", args.subsets)
    dataset = ihd.PairDataset(samples, resolution=args.resolution, random_crop=not args.no_crop,
                              flip=not args.no_flip, seed=args.seed, max_side=args.max_side, cache_dir=args.cache)
    return task, dataset


if __name__ == "__main__":
    print("the training commands moved: run `harmonize-train-refiner` or "
          "`python -m comfyui_harmonize.commands.train refiner ...`", file=sys.stderr)
    sys.exit(2)
