"""Fine-tune a Stable Diffusion inpainting UNet into DiffHarmony's harmonization UNet on iHarmony4.

    accelerate launch --multi_gpu --num_processes 8 --mixed_precision fp16 \\
        -m comfyui_harmonize.pipelines.training.diffharmony --data /data/iHarmony4 \\
        --pretrained models/diffusers/stable-diffusion-inpainting --out runs/dh-unet \\
        --batch-size 4 --lr 1e-5 --lr-scheduler piecewise_constant --lr-step-rules 1:150000,0.1 \\
        --max-steps 200000 --mixed-precision fp16 --gradient-checkpointing

As the reference describes the official training (reference/diffharmony.md): the VAE and the text encoder are
frozen; real and composite images are VAE-encoded (latent sample x scaling factor); the UNet input is
``concat([noisy real latents, mask (nearest, 1/8), composite latents])``; DDPM noise schedule from the
model's scheduler config, epsilon target (v-prediction when the config says so); the loss is the masked MSE
``mean_HW(((pred - target) * m)^2) * clamp(HW / sum(m), 1, 5)`` averaged over the batch; text is the
empty prompt; random resized crop (scale 0.5-1) + horizontal flip at 512px.

The final model (``<out>/final``) is a diffusers inpainting pipeline folder in safetensors that the pack's
DiffHarmony loader reads (copy it to ``models/diffharmony/<name>``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ..ihd import dataset as ihd
from ..core.errors import InputError, WeightsError
from ..diffharmony.pipeline import check_inpainting
from ..sd.models import load_sd
from ..sd.prompts import prompt_embedding
from ..sd.loading import SDComponents
from .common import link_or_copy_tree

COMPONENTS = ".components"


def masked_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked MSE of the official training: per image and channel the mean over H,W of
    ((pred - target) * m)^2, scaled by clamp(HW / sum(m), 1, 5), then averaged."""
    err = F.mse_loss(pred.float() * mask, target.float() * mask, reduction="none").mean(dim=(2, 3), keepdim=True)
    scale = (mask.shape[2] * mask.shape[3] / mask.sum(dim=(2, 3), keepdim=True)).clamp(1, 5)
    return (err * scale).mean()


def _randn(shape, generator, device, dtype=torch.float32):
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)


class DiffHarmonyTask:
    """The harmonization UNet's denoising objective."""

    def __init__(self, sd: SDComponents, prompt: str = ""):

        check_inpainting(sd)
        self.sd = sd
        self.model = sd.unet
        self.model.requires_grad_(True)
        sd.vae.requires_grad_(False).eval()
        sd.text_encoder.requires_grad_(False).eval()
        self.noise_scheduler = DDPMScheduler.from_config(sd.scheduler_config)
        self.prompt = prompt
        self.components: Path | None = None
        self.embedding: torch.Tensor | None = None

    def save_components(self, folder: Path) -> None:
        """The frozen parts (VAE, text encoder, tokenizer, scheduler) in safetensors, written once and linked
        into every export. Call before ``setup`` so they are saved at their loaded precision."""
        self.components = folder
        if (folder / "model_index.json").is_file():
            return
        tmp = folder.with_name(folder.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        self.sd.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        self.sd.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        self.sd.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        # the BPE files themselves, which the pack's loader (and ComfyUI's layout) look for
        self.sd.tokenizer.backend_tokenizer.model.save(str(tmp / "tokenizer"))
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(self.sd.scheduler_config, indent=1))
        sched_cls = self.sd.scheduler_config.get("_class_name", "PNDMScheduler")
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionInpaintPipeline", "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", sched_cls], "safety_checker": [None, None],
            "feature_extractor": [None, None], "requires_safety_checker": False}, indent=1))
        tmp.rename(folder)

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        self.device, self.weight_dtype = device, weight_dtype
        self.model.to(device)  # trained in fp32 master weights; autocast handles mixed precision
        self.sd.vae.to(device, dtype=weight_dtype)
        self.sd.text_encoder.to(device, dtype=weight_dtype)
        self.embedding = prompt_embedding(self.sd, self.prompt).float()

    def enable_gradient_checkpointing(self) -> None:
        self.model.enable_gradient_checkpointing()

    def loss(self, model, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        vae = self.sd.vae
        sf = vae.config.scaling_factor
        real = batch["real"].to(self.device, dtype=self.weight_dtype)
        comp = batch["comp"].to(self.device, dtype=self.weight_dtype)
        mask = batch["mask"].to(self.device, dtype=torch.float32)
        with torch.no_grad():
            real_lat = vae.encode(real).latent_dist.sample(generator=generator).float() * sf
            comp_lat = vae.encode(comp).latent_dist.sample(generator=generator).float() * sf
        m = F.interpolate(mask, size=real_lat.shape[-2:], mode="nearest")
        b = real_lat.shape[0]
        noise = _randn(real_lat.shape, generator, self.device)
        t_max = self.noise_scheduler.config.num_train_timesteps
        if generator is None:
            t = torch.randint(0, t_max, (b,), device=self.device)
        else:
            t = torch.randint(0, t_max, (b,), generator=generator).to(self.device)
        noisy = self.noise_scheduler.add_noise(real_lat, noise, t)
        x = torch.cat([noisy, m, comp_lat], dim=1)
        emb = self.embedding.expand(b, *self.embedding.shape[1:])
        pred = model(x, t, encoder_hidden_states=emb).sample
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.noise_scheduler.get_velocity(real_lat, noise, t)
        else:
            raise WeightsError(f"{self.sd.source}: unsupported prediction_type {kind!r} (epsilon or v_prediction)")
        return masked_loss(pred, target, m)

    def export(self, folder: Path, model) -> None:
        if self.components is None:
            raise InputError("save_components() must run before the first export")
        link_or_copy_tree(self.components, folder)
        model.save_pretrained(folder / "unet", safe_serialization=True)


def build(args: argparse.Namespace):
    if args.resolution % 8:
        raise InputError(f"--resolution must be a multiple of 8, got {args.resolution}")
    sd = load_sd(args.pretrained, dtype=torch.float32, tokenizer_dir=args.tokenizer)
    task = DiffHarmonyTask(sd)
    samples = ihd.list_split(args.data, "train", args.subsets)
    dataset = ihd.PairDataset(samples, resolution=args.resolution, random_crop=not args.no_crop,
                              flip=not args.no_flip, seed=args.seed, max_side=args.max_side)
    return task, dataset


def write_components(args: argparse.Namespace):
    """``prepare`` for :func:`common.train`: the frozen VAE, text encoder and tokenizer are written once,
    beside the checkpoints, by the main process."""
    def prepare(task: DiffHarmonyTask, acc) -> None:
        if acc.is_main_process:
            task.save_components(Path(args.out) / COMPONENTS)
        acc.wait_for_everyone()
        task.components = Path(args.out) / COMPONENTS

    return prepare
if __name__ == "__main__":
    print("the training commands moved: run `harmonize-train-diffharmony` or "
          "`python -m comfyui_harmonize.commands.train diffharmony ...`", file=sys.stderr)
    sys.exit(2)
