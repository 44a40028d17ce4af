"""Command lines of the three training commands (the training itself: pipelines/training/).

    harmonize-train-diffharmony --data /data/iHarmony4 --pretrained models/diffusers/sd-inpainting --out runs/dh
    harmonize-train-refiner     --data /data/iHarmony4 --diffharmony models/diffharmony/DiffHarmony --out runs/refiner
    harmonize-train-evaluator   --data /data/iHarmony4 --out runs/evaluator
    harmonize-train-condition-vae --data /data/iHarmony4 --vae models/diffharmony/DiffHarmony --out runs/cvae
    accelerate launch --multi_gpu --num_processes 8 -m comfyui_harmonize.commands.train diffharmony --data ... --out ...

Exit status: 0 trained (the process that reports says where the model went), 2 bad input or weights (a
message, no traceback).
"""
from __future__ import annotations

import argparse
import sys

from ..pipelines.core.errors import InputError, WeightsError
from ..pipelines.evaluation.evaluator import INPUT_SIZE
from ..pipelines.training import common as training
from ..pipelines.training import condition_vae as tcv
from ..pipelines.training import diffharmony as tdh
from ..pipelines.training import evaluator as tev
from ..pipelines.training import refiner as trf
from .common import fail


def add_common_args(p: argparse.ArgumentParser, *, lr: float, batch_size: int, max_steps: int,
                    ema_decay: float) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--out", required=True, help="output folder (checkpoints, final model, log)")
    g.add_argument("--max-steps", type=int, default=max_steps, help="optimizer steps to train for")
    g.add_argument("--batch-size", type=int, default=batch_size, help="images per device and step")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--lr", type=float, default=lr, help="learning rate")
    g.add_argument("--lr-scheduler", default="constant",
                   help="diffusers schedule: constant, constant_with_warmup, cosine, linear, piecewise_constant, ...")
    g.add_argument("--lr-warmup-steps", type=int, default=0)
    g.add_argument("--lr-step-rules", default=None,
                   help="for piecewise_constant: 'multiplier:until_step,...,last_multiplier', e.g. '1:150000,0.1'")
    g.add_argument("--weight-decay", type=float, default=1e-2)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = off)")
    g.add_argument("--ema-decay", type=float, default=ema_decay, help="EMA decay of the weights (0 = no EMA)")
    g.add_argument("--mixed-precision", choices=training.MIXED_PRECISION, default="no",
                   help="fp16 / bf16 autocast; frozen models are kept in that precision")
    g.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    g.add_argument("--save-every", type=int, default=0, help="write a checkpoint every N steps (0 = only the final)")
    g.add_argument("--keep-checkpoints", type=int, default=0,
                   help="keep only the newest N checkpoint folders of this run (0 = keep all)")
    g.add_argument("--resume", default=None, help="'latest' or a checkpoint folder to resume from")
    g.add_argument("--log-every", type=int, default=10, help="append to train_log.csv every N steps")
    g.add_argument("--cpu", action="store_true", help="train on the CPU even when CUDA is available")


def diffharmony_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harmonize-train-diffharmony",
                                description="Fine-tune an SD inpainting UNet into DiffHarmony's harmonization UNet.")
    p.add_argument("--data", required=True, help="iHarmony4 root")
    p.add_argument("--pretrained", required=True,
                   help="SD inpainting model: diffusers folder, DiffHarmony archive or single-file .safetensors")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder if the model has none")
    p.add_argument("--subsets", default=None, help="comma-separated subsets (default: all four)")
    p.add_argument("--resolution", type=int, default=512, help="training crop size (paper: 512)")
    p.add_argument("--no-crop", action="store_true", help="no random resized crop (plain resize)")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flip")
    p.add_argument("--max-side", type=int, default=None, help="pre-resize images so the long side is at most this")
    add_common_args(p, lr=1e-5, batch_size=4, max_steps=200_000, ema_decay=0.9999)
    return p


def refiner_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harmonize-train-refiner",
                                description="Train DiffHarmony's residual refinement UNet.")
    p.add_argument("--data", required=True, help="iHarmony4 root")
    p.add_argument("--diffharmony", default=None,
                   help="the frozen DiffHarmony that generates the inputs (archive root or pipeline folder)")
    p.add_argument("--cache", default=None, help="folder of <name>.png DiffHarmony results instead of generating")
    p.add_argument("--config", default="base", help=f"{', '.join(trf.PRESETS)} or a config.json (new refiner)")
    p.add_argument("--init", default=None, help="start from an existing refinement/ folder (fine-tuning)")
    p.add_argument("--in-channels", type=int, choices=(3, 4, 7), default=7,
                   help="7 = [harmonized, mask, composite] (released model); 4 = without the composite; 3 = alone")
    p.add_argument("--resolution", type=int, default=512, help="crop size the inputs are generated at")
    p.add_argument("--refine-resolution", type=int, default=256, help="refiner input/output size")
    p.add_argument("--gen-steps", type=int, default=5, help="DiffHarmony sampling steps when generating")
    p.add_argument("--gen-scheduler", default="euler_ancestral")
    p.add_argument("--subsets", default=None)
    p.add_argument("--no-crop", action="store_true")
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--max-side", type=int, default=None)
    p.add_argument("--tokenizer", default=None)
    add_common_args(p, lr=1e-4, batch_size=8, max_steps=100_000, ema_decay=0.9999)
    return p


def evaluator_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harmonize-train-evaluator",
                                description="Train the harmony evaluator (ResNet-50 over RGB + mask).")
    p.add_argument("--data", default=None, help="iHarmony4 root: composites = 0, real images = 1")
    p.add_argument("--scores", default=None, help="CSV image,mask,score with soft labels in [0, 1]")
    p.add_argument("--subsets", default=None)
    p.add_argument("--init", default=None, help="torchvision-layout ResNet state dict to start from")
    p.add_argument("--size", type=int, default=INPUT_SIZE, help="input side (paper: 256)")
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--layers", default="3,4,6,3", help="bottleneck blocks per stage (ResNet-50: 3,4,6,3)")
    p.add_argument("--base-width", type=int, default=64, help="channels of the stem (ResNet-50: 64)")
    add_common_args(p, lr=1e-4, batch_size=32, max_steps=5_000, ema_decay=0.0)
    return p


def condition_vae_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harmonize-train-condition-vae",
                                description="Train DiffHarmony's condition VAE (the archive's condition_vae/) with "
                                            "the authors' objective.")
    p.add_argument("--data", required=True, help="iHarmony4 root")
    p.add_argument("--vae", default=None, help="VAE to start a new condition VAE from: the DiffHarmony archive "
                                               "(its base/vae), a pipeline folder or a diffusers VAE folder")
    p.add_argument("--init", default=None, help="continue from an existing condition_vae/ folder")
    p.add_argument("--mode", choices=tcv.MODES, default="normal",
                   help="normal: reconstruct the real image given [composite, mask] (condition_vae/); inverse: "
                        "reconstruct the composite given [real, mask] (the authors' cvae-gen)")
    p.add_argument("--freeze-decoder", action="store_true", help="train only the conditional encoder and the "
                                                                 "latent skip")
    p.add_argument("--resolution", type=int, default=256, help="training crop size (the authors' script: 256)")
    p.add_argument("--subsets", default=None, help="comma-separated subsets (default: all four)")
    p.add_argument("--no-crop", action="store_true", help="no random resized crop (plain resize)")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flip")
    p.add_argument("--max-side", type=int, default=None, help="pre-resize images so the long side is at most this")
    add_common_args(p, lr=1e-4, batch_size=16, max_steps=100_000, ema_decay=0.9999)
    return p


def run(name: str, args: argparse.Namespace, build, done: str, prepare=None) -> int:
    """Train; print where the model went (main process) or the error; return the exit status."""
    try:
        final, main_process = training.train(args, build, prepare)
    except (InputError, WeightsError, OSError) as exc:
        return fail(f"harmonize-train-{name}", exc)
    if main_process:
        print(done.format(final=final))
    return 0


def main_diffharmony(argv=None) -> int:
    args = diffharmony_parser().parse_args(argv)
    return run("diffharmony", args, tdh.build, "DiffHarmony UNet written to {final} (a diffusers inpainting "
               "folder: copy it to models/diffharmony/)", tdh.write_components(args))


def main_refiner(argv=None) -> int:
    return run("refiner", refiner_parser().parse_args(argv), trf.build,
               "refinement UNet written to {final} (copy it to models/diffharmony/<archive>/refinement)")


def main_evaluator(argv=None) -> int:
    return run("evaluator", evaluator_parser().parse_args(argv), tev.build,
               "harmony evaluator written to {final}/" + tev.FILE_NAME + " (copy it to models/harmony_evaluator/)")


def main_condition_vae(argv=None) -> int:
    return run("condition-vae", condition_vae_parser().parse_args(argv), tcv.build,
               "condition VAE written to {final} (copy it to models/diffharmony/<archive>/condition_vae)")


COMMANDS = {"diffharmony": main_diffharmony, "refiner": main_refiner, "evaluator": main_evaluator,
            "condition-vae": main_condition_vae}


def main(argv=None) -> int:
    """``python -m comfyui_harmonize.commands.train {diffharmony,refiner,evaluator} [options]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m comfyui_harmonize.commands.train {{{','.join(COMMANDS)}}} [options] "
              f"(-h after the name for its options)", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
