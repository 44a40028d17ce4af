"""Command line of the iHarmony4 benchmark (the benchmark itself: pipelines/ihd/benchmark.py).

    harmonize-benchmark --data /data/iHarmony4 --method diffharmony --model models/diffharmony/DiffHarmony \\
        --resolution 1024 --out runs/diffharmony-1024
    accelerate launch --multi_gpu --num_processes 8 -m comfyui_harmonize.commands.benchmark --data ... --out ...

Exit status: 0 done, 2 bad input or weights (a message, no traceback).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..pipelines.core.dtypes import DTYPES
from ..pipelines.core.errors import InputError, WeightsError
from ..pipelines.evaluation.metrics import DEFAULT_SIZE as METRIC_SIZE
from ..pipelines.ihd import benchmark as bm
from ..pipelines.ihd.dataset import SPLITS
from .common import DTYPE_HELP, fail


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harmonize-benchmark",
                                description="Run a harmonization method over iHarmony4 and write the paper's tables.")
    p.add_argument("--data", required=True, help="iHarmony4 root (with IHD_test.txt and the four subset folders)")
    p.add_argument("--out", required=True, help="output folder (created; resumes when it holds the same run)")
    p.add_argument("--method", choices=bm.METHODS, default="diffharmony")
    p.add_argument("--split", choices=SPLITS, default="test")
    p.add_argument("--subsets", default=None, help="comma-separated subsets (default: all four)")
    p.add_argument("--limit", type=int, default=None, help="only the first N composites of each subset")
    p.add_argument("--max-side", type=int, default=None,
                   help="pre-resize inputs so the long side is at most this (e.g. 1024 for HAdobe5k)")
    p.add_argument("--metric-size", type=int, default=METRIC_SIZE,
                   help="images are measured at this square size (256 = the paper; 0 = native size)")
    p.add_argument("--no-quantize", action="store_true", help="measure float images (no 8-bit levels)")
    p.add_argument("--pred-levels", choices=bm.PRED_LEVELS, default="round",
                   help="how a result becomes 8-bit before it is measured and saved: round, or truncate as the "
                        "official script's saved files are (use with --preprocess official for parity)")
    p.add_argument("--seed", type=int, default=0, help="base seed; each image's seed is derived from it and its name")
    p.add_argument("--save-images", action="store_true", help="also write images/<name>.png")
    p.add_argument("--label", default=None, help="method name shown in the tables")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    p.add_argument("--quiet", action="store_true", help="no progress bar or printed table")
    g = p.add_argument_group("diffharmony")
    g.add_argument("--model", help="DiffHarmony archive root (base/ + refinement/), a diffusers inpainting folder "
                                   "or a single-file .safetensors")
    g.add_argument("--refiner", default=None, help="refinement/ folder (default: <model>/refinement when present)")
    g.add_argument("--no-refine", action="store_true", help="skip the refinement stage")
    g.add_argument("--resolution", type=int, default=1024, help="working resolution (paper: 512 or 1024)")
    g.add_argument("--fit", choices=("square", "keep-aspect"), default="square",
                   help="square = the official resize to resolution x resolution; keep-aspect = long side")
    g.add_argument("--steps", type=int, default=5)
    g.add_argument("--scheduler", default="euler_ancestral")
    g.add_argument("--guidance", type=float, default=1.0)
    g.add_argument("--refine-resolution", type=int, default=256)
    g.add_argument("--dtype", choices=list(DTYPES), default="auto", help=DTYPE_HELP)
    g.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder if the model has none")
    g.add_argument("--decoder", choices=bm.DECODERS, default="vae",
                   help="condition-vae: decode with the archive's condition_vae/ (beside base/, or --condition-vae)")
    g.add_argument("--condition-vae", default=None, help="condition_vae/ folder (default: beside the model's base/)")
    g.add_argument("--preprocess", choices=bm.PREPROCESS, default="pack",
                   help="official: feed the networks exactly what the authors' loader feeds them (PIL resize of "
                        "the 8-bit files, dithered 1-bit mask, square, their 256 square result without the "
                        "background pasted back); pack: the pack's own path")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.method == "diffharmony" and not args.model:
        p.error("--model is required for --method diffharmony")
    if args.metric_size < 0:
        p.error("--metric-size must be >= 0")
    if args.max_side is not None and args.max_side < 8:
        p.error(f"--max-side {args.max_side}: expected a long side of at least 8 pixels (leave it out to keep "
                f"the images' own size)")
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit {args.limit}: expected at least 1 composite per subset")
    if not 0 <= args.seed < 2**63:
        p.error(f"--seed {args.seed}: expected 0..2**63-1")
    if args.method == "diffharmony":
        if not 1 <= args.steps <= 1000:
            p.error(f"--steps {args.steps}: expected 1..1000 (the paper: 5)")
        if args.resolution % 8 or not 8 <= args.resolution <= 16384:
            p.error(f"--resolution {args.resolution}: expected a multiple of 8 in 8..16384 (the paper: 512 or 1024)")
        if args.refine_resolution % 16 or not 16 <= args.refine_resolution <= 16384:
            p.error(f"--refine-resolution {args.refine_resolution}: expected a multiple of 16 in 16..16384 "
                    f"(the paper: 256)")
    if args.method == "diffharmony" and args.preprocess == "official" and args.max_side is not None:
        p.error("--max-side resizes the inputs, but --preprocess official reads the files as the authors' "
                "loader does: leave one of them out")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file; expected an output folder")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        bm.run(args)
    except (InputError, WeightsError, OSError) as exc:
        return fail("harmonize-benchmark", exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
