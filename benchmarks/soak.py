"""Soak test: does memory grow over many runs in one process (as in a long ComfyUI session)?

    python benchmarks/soak.py [--runs 200] [--transfers 50] [--size 2000x1500]

1. ``--runs`` runs of the all-in-one DiffHarmony node (refiner and detail transfer on) on a small
   random-weight model of Stable Diffusion's layout, built in memory (memory growth does not depend on the
   weights; DiffHarmony only ever encodes the empty prompt, so a tokenizer that gives the empty prompt's
   ids stands in for CLIP's);
2. ``--transfers`` runs of the full-resolution Color Transfer node at ``--size`` (W x H).

Prints the process's resident memory (RSS, from /proc) and, with CUDA, the memory torch holds, at fixed
run counts, and the growth in percent from the first count after warm-up to the last. glibc keeps freed
blocks of large temporaries mapped, so the raw RSS of a process that allocates 100 MB buffers swings by
hundreds of MB from run to run; before each reading the script returns freed memory to the system
(``malloc_trim``) so the growth figure follows what is really held, and prints the raw figure beside it. Each run gets new
input tensors, as ComfyUI hands over new outputs of upstream nodes.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT.parent) not in sys.path and (ROOT.parent / "comfyui_harmonize").exists():
    sys.path.insert(0, str(ROOT.parent))

from comfyui_harmonize.nodes import color as color_nodes  # noqa: E402
from comfyui_harmonize.nodes import diffharmony as dh_nodes  # noqa: E402
from comfyui_harmonize.pipelines.diffharmony.refiner import RefinerUNet  # noqa: E402
from comfyui_harmonize.pipelines.sd.loading import SDComponents  # noqa: E402

SCHEDULER = {"_class_name": "EulerAncestralDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "steps_offset": 1, "timestep_spacing": "leading"}


class EmptyPromptTokenizer:
    """Gives CLIP's ids of the empty prompt (start, end, then end-token padding) for any text: enough for
    DiffHarmony, which encodes only the empty prompt."""

    model_max_length = 77

    def __call__(self, text, padding=None, max_length=77, truncation=True, return_tensors="pt"):
        ids = torch.full((1, max_length), 49407, dtype=torch.long)
        ids[0, 0] = 49406
        return type("Encoding", (), {"input_ids": ids})()


def small_model() -> tuple[SDComponents, RefinerUNet]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        in_channels=9, block_out_channels=(32, 64, 64, 64), layers_per_block=1, cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=16, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_hidden_layers=2, max_position_embeddings=77))
    sd = SDComponents(*(m.eval().requires_grad_(False) for m in (unet, vae, te)), EmptyPromptTokenizer(), SCHEDULER,
                      "soak: random small SD layout", torch.float32)
    refiner = RefinerUNet(block_out_channels=(16, 32, 32, 32), norm_num_groups=8, layers_per_block=1)
    return sd, refiner.eval().requires_grad_(False)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def trim() -> bool:
    """Return freed heap memory to the system (glibc); False where there is no malloc_trim."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) or True)
    except (OSError, AttributeError):
        return False


def memory_line(run: int, start: float) -> tuple[str, float]:
    gc.collect()
    raw = rss_mib()
    trimmed = trim()
    rss = rss_mib()
    text = f"  run {run:4d}: RSS {rss:8.1f} MiB" + (f" (before malloc_trim {raw:8.1f} MiB)" if trimmed else "")
    if torch.cuda.is_available():
        text += f", CUDA allocated {torch.cuda.memory_allocated() / 2**20:8.1f} MiB"
    return text + f"  ({time.perf_counter() - start:6.1f} s)", rss


def soak(name: str, runs: int, marks: list[int], step) -> None:
    print(f"{name}: {runs} runs")
    start = time.perf_counter()
    recorded = {}
    for i in range(1, runs + 1):
        step(i)
        if i in marks:
            line, recorded[i] = memory_line(i, start)
            print(line, flush=True)
    first, last = min(k for k in recorded if k > 1 or len(recorded) == 1), max(recorded)
    growth = 100.0 * (recorded[last] - recorded[first]) / recorded[first]
    print(f"  growth from run {first} to run {last}: {growth:+.2f} %  ({recorded[last] - recorded[first]:+.1f} MiB)")


def marks_for(n: int, fractions=(0.0, 0.05, 0.25, 0.5, 0.75, 1.0)) -> list[int]:
    return sorted({max(1, round(n * f)) for f in fractions})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=200, help="all-in-one DiffHarmony runs (tiny model)")
    p.add_argument("--transfers", type=int, default=50, help="color transfer runs at --size")
    p.add_argument("--size", default="2000x1500", help="color transfer composite size, WxH")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.lower().split("x"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")

    sd, refiner = small_model()
    node = dh_nodes.HarmonizeDiffHarmony()

    def composite(i: int, hh: int, ww: int):
        g = torch.Generator().manual_seed(i)
        image = torch.nn.functional.interpolate(torch.rand(1, 3, hh // 8, ww // 8, generator=g), size=(hh, ww),
                                                mode="bilinear").permute(0, 2, 3, 1).contiguous()
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, hh), torch.linspace(-1, 1, ww), indexing="ij")
        return image, ((yy / 0.5) ** 2 + (xx / 0.4) ** 2 <= 1).float()[None]

    def dh_run(i: int):
        image, mask = composite(i, 96, 128)
        node.harmonize(sd, image, mask, i, 2, "euler_ancestral", 1.0, 64, dh_nodes.FITS[0], 64, 4, "transfer",
                       refiner=refiner)

    transfer = color_nodes.HarmonizeColorTransfer()

    def transfer_run(i: int):
        image, mask = composite(i, h, w)
        transfer.run(image, (image[:, ::2, ::2] * 0.8).contiguous(), mask, 8)

    if args.runs:
        soak("all-in-one DiffHarmony node (96x128, working 64 px, 2 steps, refiner, detail transfer, feather 4)",
             args.runs, marks_for(args.runs), dh_run)
    if args.transfers:
        soak(f"Color Transfer node at {w}x{h} (feather 8)", args.transfers, marks_for(args.transfers), transfer_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
