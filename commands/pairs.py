"""Command line: training pairs from your own photos with DiffHarmony's inverse model, written as one
iHarmony4 subset that the training commands read (the work: pipelines/ihd/pairs.py).

    harmonize-make-pairs --photos my/photos --masks my/masks --inverse models/diffharmony/DiffHarmony --out data/mine
    harmonize-make-pairs ... --rounds 10 --evaluator models/harmony_evaluator/evaluator.safetensors

A photo ``<stem>.<ext>`` in --photos has its masks in --masks named ``<stem>.<ext>`` or
``<stem>_<anything>.<ext>`` (several per photo; a mask goes to the photo with the longest stem it matches).
Each (photo, mask) gets --rounds composites, round r with seed --seed + r - 1; with --evaluator only the one
it rates least harmonious is kept. Written: <out>/<Subset>/{real_images,masks,composite_images}/ with new
names (f1.jpg, f1_1.png, f1_1_<r>.jpg for HFlickr), <Subset>_<split>.txt, and <Subset>_<split>_sources.csv
mapping them to your files, and <Subset>_<split>_run.json recording the run. Nothing is overwritten: an
--out whose subset already holds a dataset is refused. A stopped run (Ctrl-C) leaves a consistent dataset:
the list names only finished samples; the same command with --resume finishes it (the same photos, masks,
settings and models, checked against the record), giving what an uninterrupted run gives.

Every input is checked before any model is loaded; a user error prints one message and exits with code 2
(no traceback); an interrupted run exits with 130.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..pipelines.core.dtypes import DTYPES, resolve_dtype
from ..pipelines.core.errors import InputError, WeightsError
from ..pipelines.diffharmony import pipeline as dh
from ..pipelines.diffharmony.condition_vae import load_condition_vae
from ..pipelines.diffharmony.inverse import load_inverse
from ..pipelines.evaluation.evaluator import load_evaluator
from ..pipelines.ihd import pairs
from ..pipelines.ihd.dataset import SPLITS, SUBSETS
from .common import DTYPE_HELP, check_device, fail, tokenizer_dir

PROG = "harmonize-make-pairs"
FITS = ("square", "keep-aspect")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--photos", required=True, help="folder of real photos (image files)")
    p.add_argument("--masks", required=True, help="folder of masks: <stem>.png or <stem>_<anything>.png per photo")
    p.add_argument("--out", required=True, help="dataset root the subset folder is written into")
    p.add_argument("--subset", choices=SUBSETS, default=pairs.DEFAULT_SUBSET,
                   help="subset name (and so the names' first letter) to write under")
    p.add_argument("--split", choices=SPLITS, default="train")
    p.add_argument("--resume", action="store_true",
                   help="continue the stopped run recorded in --out (same photos, masks, settings and models)")
    p.add_argument("--inverse", required=True,
                   help="the DiffHarmony archive root (its inverse/ and base/) or its inverse/ folder")
    p.add_argument("--condition-vae", default=None,
                   help="a condition VAE folder to decode with, e.g. one trained by harmonize-train-condition-vae "
                        "--mode inverse (the authors' cvae-gen)")
    p.add_argument("--evaluator", default=None,
                   help="harmony evaluator file: keep only the candidate it rates least harmonious per mask")
    p.add_argument("--rounds", type=int, default=1, help="candidate composites per mask (the authors: 10)")
    p.add_argument("--seed", type=int, default=0, help="round r runs with seed SEED + r - 1")
    p.add_argument("--steps", type=int, default=dh.DEFAULT_STEPS)
    p.add_argument("--resolution", type=int, default=dh.DEFAULT_RESOLUTION, help="working resolution (long side)")
    p.add_argument("--fit", choices=FITS, default="square",
                   help="square = the authors' resize to resolution x resolution; keep-aspect = long side")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto", help=DTYPE_HELP)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder if the model has none; default: "
                                                    "$COMFYUI_PATH/comfy/sd1_tokenizer")
    return p


def check_paths(args) -> None:
    problems = []
    if not Path(args.inverse).exists():
        problems.append(f"--inverse {args.inverse}: not found (expected the DiffHarmony archive root or its "
                        f"inverse/ folder)")
    for flag, value in (("--condition-vae", args.condition_vae), ("--tokenizer", args.tokenizer)):
        if value and not Path(value).is_dir():
            problems.append(f"{flag} {value}: folder not found")
    if args.evaluator and not Path(args.evaluator).is_file():
        problems.append(f"--evaluator {args.evaluator}: file not found (expected a harmony evaluator "
                        f".safetensors/.pth)")
    if problems:
        raise InputError(f"{len(problems)} problem(s) with the model paths, nothing was loaded:\n  "
                         + "\n  ".join(problems))


def run(args) -> tuple[pairs.Plan, list[dict]]:
    check_paths(args)
    device = check_device(args.device)
    settings = pairs.Settings(rounds=args.rounds, seed=args.seed, steps=args.steps, resolution=args.resolution,
                              square=args.fit == "square")
    models = {role: str(Path(path).resolve()) for role, path in
              (("inverse", args.inverse), ("condition_vae", args.condition_vae), ("evaluator", args.evaluator)) if path}
    plan = pairs.plan(args.photos, args.masks, args.out, args.subset, args.split, settings, models, args.resume)
    dtype = resolve_dtype(args.dtype, device)
    sd = load_inverse(args.inverse, dtype, tokenizer_dir=tokenizer_dir(args.tokenizer))
    for module in sd.modules().values():
        module.to(device)
    cvae = load_condition_vae(args.condition_vae, dtype).to(device) if args.condition_vae else None
    evaluator = None
    if args.evaluator:
        evaluator = load_evaluator(args.evaluator, dtype)
        evaluator.model.to(device)
    try:
        with tqdm(total=len(plan.pairs) * args.rounds * args.steps, unit="step", disable=None) as bar:
            rows = pairs.write_pairs(sd, plan, condition_vae=cvae, evaluator=evaluator,
                                     callback=lambda i, n: bar.update(i - bar.n))
    except KeyboardInterrupt:
        print(f"{PROG}: {plan.root / plan.subset} is consistent: {plan.list_path.name} names the "
              f"{pairs.listed(plan)} composite(s) finished; the same command with --resume finishes the run",
              file=sys.stderr)
        raise
    return plan, rows


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        plan, rows = run(args)
    except (InputError, WeightsError) as exc:
        return fail(PROG, exc)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(f"{len(rows)} composite(s) written ({pairs.listed(plan)} listed in all) for {len(plan.pairs)} mask(s) "
          f"to {plan.root / plan.subset}\n"
          f"list: {plan.list_path}\nsources: {plan.sources_path}\n"
          f"train with: --data {plan.root} --subsets {plan.subset}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
