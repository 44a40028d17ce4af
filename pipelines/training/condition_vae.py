"""Train DiffHarmony's condition VAE (the archive's ``condition_vae/``) with the authors' objective.

    harmonize-train-condition-vae --data /data/iHarmony4 --vae models/diffharmony/DiffHarmony --out runs/cvae

As the authors' scripts/train/cvae.py (and scripts/train_cvae.sh) do it: a new condition VAE starts from a
VAE (their sd-vae-ft-mse; here ``--vae``: the archive, whose ``base/vae`` is used, or any diffusers VAE
folder) with every skip convolution at zero (``ConditionVAE.from_vae``), or continues from an existing
``condition_vae/`` (``--init``). The encoder and the quant convs stay frozen; the conditional encoder,
``latent_skip_conv`` and, unless ``--freeze-decoder``, the decoder are trained. Each step encodes the REAL
image, samples its posterior, decodes it with the condition ``[composite, mask]`` (the condition's posterior
sampled too) and takes the L1 loss to the real image over the whole image (their logged MSE is not
optimised). ``--mode inverse`` swaps the roles as their ``--mode inverse`` does (the composite is encoded and
reconstructed, the real image is the condition): the ``cvae-gen`` that pairs with the inverse model.
Defaults follow their script: 256 px, lr 1e-4, AdamW weight decay 1e-2, gradient clipping 1.0, EMA 0.9999.

The final model (``<out>/final``) is a ``condition_vae/`` folder (config.json +
diffusion_pytorch_model.safetensors) that the pack's condition-VAE loader reads.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.errors import InputError, WeightsError
from ..diffharmony.condition_vae import ConditionVAE, load_condition_vae, save_condition_vae
from ..ihd import dataset as ihd
from .refiner import enable_block_checkpointing

MODES = ("normal", "inverse")


def load_base_vae(path: str | Path):
    """A diffusers ``AutoencoderKL`` from a VAE folder, a pipeline folder (its ``vae/``) or the DiffHarmony
    archive (``base/vae``)."""
    from diffusers import AutoencoderKL

    path = Path(path)
    for cand in (path, path / "vae", path / "base" / "vae"):
        if (cand / "config.json").is_file():
            try:
                return AutoencoderKL.from_pretrained(str(cand), local_files_only=True)
            except Exception as exc:
                raise WeightsError(f"could not load the VAE in {cand}: {exc}") from exc
    raise WeightsError(f"no VAE found at {path}: looked for config.json in {path}, {path / 'vae'} and "
                       f"{path / 'base' / 'vae'} (a diffusers AutoencoderKL folder)")


class ConditionVAETask:
    """L1 between the condition VAE's reconstruction and its input (the real image, ``normal`` mode)."""

    def __init__(self, model: ConditionVAE, mode: str = "normal", freeze_decoder: bool = False):
        if mode not in MODES:
            raise InputError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.model = model.train().trainable(freeze_decoder)
        self.mode = mode

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        self.model.to(device)

    def enable_gradient_checkpointing(self) -> None:
        enable_block_checkpointing(self.model)

    def loss(self, model, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        device = next(self.model.parameters()).device
        real, comp, mask = (batch[k].float().to(device) for k in ("real", "comp", "mask"))
        target, other = (real, comp) if self.mode == "normal" else (comp, real)
        out = model(target, torch.cat([other, mask], dim=1), generator=generator)
        return F.l1_loss(out.float(), target.float())

    def export(self, folder: Path, model) -> None:
        save_condition_vae(model, folder)


def build(args: argparse.Namespace):
    if args.init:
        model = load_condition_vae(args.init).requires_grad_(True)
    elif args.vae:
        model = ConditionVAE.from_vae(load_base_vae(args.vae).float(), additional_in_channels=1)
    else:
        raise InputError("give --vae (a VAE to start a new condition VAE from, e.g. the DiffHarmony archive) or "
                         "--init (a condition_vae/ folder to continue)")
    task = ConditionVAETask(model, args.mode, args.freeze_decoder)
    samples = ihd.list_split(args.data, "train", args.subsets)
    dataset = ihd.PairDataset(samples, resolution=args.resolution, random_crop=not args.no_crop,
                              flip=not args.no_flip, seed=args.seed, max_side=args.max_side)
    return task, dataset
