"""iHarmony4 benchmark: run a harmonization method over a split, measure it, write the paper's tables.

    python -m comfyui_harmonize.pipelines.ihd.benchmark --data /data/iHarmony4 --method diffharmony \\
        --model models/diffharmony/DiffHarmony --resolution 1024 --out runs/diffharmony-1024

    accelerate launch --multi_gpu --num_processes 8 -m comfyui_harmonize.pipelines.ihd.benchmark ...

Methods: ``diffharmony`` (the pack's all-in-one pipeline: any resolution, refinement on/off, steps, scheduler,
seed), ``composite`` (the input itself: the "composite" row of the papers' tables) and ``color_match`` (a
global Reinhard colour transfer in Lab: the foreground's mean/std matched to the background's, what a
colour-match node gives; pipelines/color/match.py).

Outputs in ``--out``:
- ``run.json``: the settings that determine the results; a folder never mixes results of other settings;
- ``parts/part-<rank>.csv``: rows appended (and flushed) as images finish, each only after its image was
  saved (with ``--save-images``); they make the run resumable, and a resumed run computes again every image
  whose row or saved image is missing;
- ``per_image.csv``: every image of the list in list order (regenerated from the parts at the end);
- ``summary.md`` / ``summary.json``: Table 1 layout (per subset and all: PSNR / MSE / fMSE, plus bMSE) and
  the foreground-ratio table (MSE / fMSE per bucket);
- with ``--save-images``: ``images/<name>.png`` at the composite's size.

Every image's seed is derived from its name and ``--seed`` (not from its position or the process that runs
it), so a distributed run writes the same rows as a single process.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch

from . import dataset as ihd
from ..evaluation import metrics
from ..color.match import lab_color_match
from ..core.errors import InputError, WeightsError

FIELDS = ("name", "subset", "psnr", "mse", "fmse", "bmse", "fg_ratio", "bucket", "seed")
METHODS = ("diffharmony", "composite", "color_match")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Published figures for all of iHarmony4 (reference/evaluation.md, reference/diffharmony.md): PSNR, MSE, fMSE.
PUBLISHED = {
    "composite (input), paper": (31.63, 172.47, 1376.42),
    "DiffHarmony 1024 + refine, paper": (40.44, 14.29, 151.42),
    "DiffHarmony 1024 no refine, paper": (40.12, 15.56, 166.19),
    "DiffHarmony 512 + refine, paper": (39.47, 19.59, 205.07),
    "DiffHarmony 512 no refine, paper": (37.65, 26.14, 290.66),
}
Method = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


# ------------------------------------------------------------------------------------------- methods
def build_method(args: argparse.Namespace, device: torch.device) -> Method:
    if args.method == "composite":
        return lambda composite, mask, seed: composite.clone()
    if args.method == "color_match":
        return lambda composite, mask, seed: lab_color_match(composite, mask)
    if args.method == "diffharmony":
        from ..diffharmony import pipeline as dh
        from ..diffharmony.refiner import load_refiner

        dtype = _dtype(args.dtype, device)
        sd = dh.load_diffharmony(args.model, dtype=dtype, tokenizer_dir=args.tokenizer)
        for module in sd.modules().values():
            module.to(device)
        refiner = None
        refiner_path = _refiner_path(args)
        if refiner_path is not None:
            refiner = load_refiner(refiner_path, dtype=dtype).to(device)

        def run(composite, mask, seed):
            return dh.harmonize(sd, composite, mask, seed=seed, steps=args.steps, resolution=args.resolution,
                                scheduler=args.scheduler, guidance=args.guidance, square=args.fit == "square",
                                refiner=refiner, refine_resolution=args.refine_resolution)

        return run
    raise InputError(f"unknown method {args.method!r}; expected one of {', '.join(METHODS)}")


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def _refiner_path(args) -> Path | None:
    """--refiner PATH, else the archive's refinement/ folder unless --no-refine."""
    if args.no_refine:
        return None
    if args.refiner:
        return Path(args.refiner)
    auto = Path(args.model) / "refinement"
    return auto if (auto / "config.json").is_file() else None


def run_settings(args: argparse.Namespace) -> dict:
    """What determines the per-image rows (a folder's rows must all come from these settings)."""
    s = {"method": args.method, "split": args.split, "data": str(Path(args.data).resolve()),
         "metric_size": args.metric_size, "quantize": not args.no_quantize, "max_side": args.max_side,
         "seed": args.seed}
    if args.method == "diffharmony":
        refiner = _refiner_path(args)
        s.update(model=str(Path(args.model).resolve()), refiner=str(refiner.resolve()) if refiner else None,
                 resolution=args.resolution, fit=args.fit, steps=args.steps, scheduler=args.scheduler,
                 guidance=args.guidance, refine_resolution=args.refine_resolution, dtype=args.dtype)
    return s


# --------------------------------------------------------------------------------------- CSV records
def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.6f}"


def make_row(sample: ihd.Sample, values: dict[str, torch.Tensor], seed: int) -> dict:
    row = {"name": sample.name, "subset": sample.subset, "seed": str(seed)}
    for k in (*metrics.METRICS, "fg_ratio"):
        row[k] = _fmt(float(values[k][0]))
    row["bucket"] = metrics.bucket_label(float(values["fg_ratio"][0]))
    return row


def _valid(row: dict) -> bool:
    if any(row.get(k) in (None, "") for k in FIELDS):
        return False
    try:
        for k in (*metrics.METRICS, "fg_ratio"):
            float(row[k])
    except ValueError:
        return False
    return True


def read_rows(out: Path) -> dict[str, dict]:
    """Finished rows of every part file, by name. A torn last line (the process was killed while writing)
    is ignored, so that image is simply run again."""
    rows: dict[str, dict] = {}
    for part in sorted((out / "parts").glob("part-*.csv")):
        text = part.read_text(encoding="utf-8")
        lines = text.split("\n")
        if not text.endswith("\n"):
            lines = lines[:-1]  # incomplete last record
        reader = csv.DictReader(io.StringIO("\n".join(lines) + "\n"))
        if tuple(reader.fieldnames or ()) != FIELDS:
            raise InputError(f"{part} has columns {reader.fieldnames}, expected {list(FIELDS)}: it is not a part "
                             f"of this benchmark's output; use another --out folder")
        for row in reader:
            if _valid(row):
                rows[row["name"]] = {k: row[k] for k in FIELDS}
    return rows


def finished(out: Path, rows: dict[str, dict], save_images: bool) -> set[str]:
    """Names that need no new run: a row exists and, when images are saved, so does the image."""
    if not save_images:
        return set(rows)
    return {name for name in rows if (out / "images" / f"{name}.png").is_file()}


class PartWriter:
    """Appends rows to ``parts/part-<rank>.csv``, one flushed line per image."""

    def __init__(self, out: Path, rank: int):
        path = out / "parts" / f"part-{rank}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.is_file() or path.stat().st_size == 0
        self.f = open(path, "a", encoding="utf-8", newline="")
        if not new:
            with open(path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    self.f.write("\n")  # close a torn record so the next one starts on its own line
        self.w = csv.DictWriter(self.f, fieldnames=FIELDS, lineterminator="\n")
        if new:
            self.w.writeheader()
        self.f.flush()

    def write(self, row: dict) -> None:
        self.w.writerow(row)
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def check_out_folder(out: Path, settings: dict, write: bool = True) -> None:
    """Make sure ``out`` holds no run with other settings; with ``write``, record these settings in
    ``out/run.json`` when the folder holds no run yet."""
    path = out / "run.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        diff.update({k: (v, None) for k, v in old.items() if k not in settings})
        if diff:
            shown = "; ".join(f"{k}: folder {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise InputError(f"{out} holds results of a run with other settings ({shown}). Resume with the same "
                             f"settings, or choose another --out folder.")
        return
    if not write:
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------- tables
def _num(v: float, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def summary(rows: list[dict], label: str) -> dict:
    """Per-subset and per-bucket averages of per-image rows (strings from the CSV or numbers)."""
    parsed = [{**r, **{k: float(r[k]) for k in (*metrics.METRICS, "fg_ratio")}} for r in rows]
    return {"method": label, "images": len(parsed), "by_subset": metrics.summarize(parsed, "subset"),
            "by_bucket": metrics.summarize(parsed, "bucket")}


def format_summary(s: dict, settings: dict | None = None) -> str:
    subsets = [x for x in ihd.SUBSETS if x in s["by_subset"]]
    cols = subsets + ["all"]
    lines = [f"# iHarmony4 {settings.get('split', 'test') if settings else 'test'} — {s['method']}", ""]
    if settings:
        lines += ["Settings: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items()) if k != "data"), ""]
    lines += ["## Table 1 layout (per-image metrics at 256x256, averaged; PSNR peak 255)", ""]
    head = "| method | " + " | ".join(f"{c} PSNR↑ | {c} MSE↓ | {c} fMSE↓" for c in cols) + " |"
    lines += [head, "|" + "---|" * (1 + 3 * len(cols))]
    lines.append(f"| {s['method']} | " + " | ".join(
        f"{_num(s['by_subset'][c]['psnr'])} | {_num(s['by_subset'][c]['mse'])} | {_num(s['by_subset'][c]['fmse'])}"
        for c in cols) + " |")
    lines += ["", "| subset | images | PSNR↑ | MSE↓ | fMSE↓ | bMSE↓ |", "|---|---|---|---|---|---|"]
    for c in cols:
        e = s["by_subset"][c]
        lines.append(f"| {c} | {e['count']} | {_num(e['psnr'])} | {_num(e['mse'])} | {_num(e['fmse'])} | "
                     f"{_num(e['bmse'])} |")
    lines += ["", "## By foreground ratio", "", "| foreground | images | MSE↓ | fMSE↓ | PSNR↑ |",
              "|---|---|---|---|---|"]
    for label in (*metrics.BUCKET_LABELS, "all"):
        e = s["by_bucket"][label]
        name = "0-100%" if label == "all" else label
        lines.append(f"| {name} | {e['count']} | {_num(e['mse'])} | {_num(e['fmse'])} | {_num(e['psnr'])} |")
    lines += ["", "## Published (all of iHarmony4, 256x256)", "", "| method | PSNR↑ | MSE↓ | fMSE↓ |",
              "|---|---|---|---|"]
    lines += [f"| {k} | {p:.2f} | {m:.2f} | {f:.2f} |" for k, (p, m, f) in PUBLISHED.items()]
    return "\n".join(lines) + "\n"


def write_results(out: Path, samples: list[ihd.Sample], settings: dict, label: str) -> dict:
    """per_image.csv (list order) + summary.md/json from the part files."""
    done = read_rows(out)
    rows = [done[s.name] for s in samples if s.name in done]
    tmp = out / "per_image.csv.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / "per_image.csv")
    s = summary(rows, label)
    s["complete"] = len(rows) == len(samples)
    s["settings"] = settings
    (out / "summary.json").write_text(json.dumps(s, indent=2, default=_json_num) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(format_summary(s, settings), encoding="utf-8")
    return s


def _json_num(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def _label(args) -> str:
    if args.label:
        return args.label
    if args.method != "diffharmony":
        return args.method
    refine = "refine" if _refiner_path(args) else "no refine"
    return f"DiffHarmony {args.resolution} {args.fit} {refine}, {args.steps} steps"


def save_png(image: torch.Tensor, path: Path) -> None:
    """IMAGE ``[1,H,W,3]`` as an 8-bit PNG; an existing file is left alone (it holds the same result)."""
    from PIL import Image

    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(arr).save(tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace, on_image: Callable[[str], None] | None = None) -> dict | None:
    """Run the benchmark; returns the summary on the main process (None on the others)."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState(cpu=args.cpu or not torch.cuda.is_available(), timeout=timedelta(hours=12))
    out = Path(args.out)
    # every process checks the same things before anything is written, so all stop on the same error
    samples = ihd.list_split(args.data, args.split, args.subsets, limit=args.limit)
    settings = run_settings(args)
    check_out_folder(out, settings, write=False)
    state.wait_for_everyone()
    if state.is_main_process:
        check_out_folder(out, settings)
    state.wait_for_everyone()
    done = finished(out, read_rows(out), args.save_images)
    todo = [s for s in samples if s.name not in done]
    mine = todo[state.process_index::state.num_processes]
    metric_size = args.metric_size or None
    if mine:
        method = build_method(args, state.device)
        writer = PartWriter(out, state.process_index)
        desc = f"{_label(args)} [{state.process_index + 1}/{state.num_processes}]"
        try:
            for s in tqdm(mine, desc=desc, unit="img", disable=args.quiet or None, dynamic_ncols=True,
                          position=state.process_index):
                d = ihd.load_sample(s, args.max_side)
                seed = ihd.name_seed(s.name, args.seed)
                result = method(d["composite"], d["mask"], seed)
                values = metrics.image_metrics(result, d["real"], d["mask"], size=metric_size,
                                               quantize=not args.no_quantize)
                if args.save_images:  # the image first: a row is the record that the image is complete
                    save_png(result, out / "images" / f"{s.name}.png")
                writer.write(make_row(s, values, seed))
                if on_image is not None:
                    on_image(s.name)
        finally:
            writer.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    s = write_results(out, samples, settings, _label(args))
    if not args.quiet:
        print((out / "summary.md").read_text(encoding="utf-8"))
        skipped = len(samples) - len(todo)
        if skipped:
            print(f"{skipped} of {len(samples)} images were already done in {out} and were not run again.")
    return s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m comfyui_harmonize.pipelines.ihd.benchmark",
                                description="Run a harmonization method over iHarmony4 and write the paper's tables.")
    p.add_argument("--data", required=True, help="iHarmony4 root (with IHD_test.txt and the four subset folders)")
    p.add_argument("--out", required=True, help="output folder (created; resumes when it holds the same run)")
    p.add_argument("--method", choices=METHODS, default="diffharmony")
    p.add_argument("--split", choices=ihd.SPLITS, default="test")
    p.add_argument("--subsets", default=None, help="comma-separated subsets (default: all four)")
    p.add_argument("--limit", type=int, default=None, help="only the first N composites of each subset")
    p.add_argument("--max-side", type=int, default=None,
                   help="pre-resize inputs so the long side is at most this (e.g. 1024 for HAdobe5k)")
    p.add_argument("--metric-size", type=int, default=metrics.DEFAULT_SIZE,
                   help="images are measured at this square size (256 = the paper; 0 = native size)")
    p.add_argument("--no-quantize", action="store_true", help="measure float images (no 8-bit rounding)")
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
    g.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto = fp16 on CUDA, fp32 on CPU")
    g.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder if the model has none")
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
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file; expected an output folder")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (InputError, WeightsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
