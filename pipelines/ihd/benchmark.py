"""iHarmony4 benchmark: run a harmonization method over a split, measure it, write the paper's tables.

    harmonize-benchmark --data /data/iHarmony4 --method diffharmony \\
        --model models/diffharmony/DiffHarmony --resolution 1024 --out runs/diffharmony-1024

    accelerate launch --multi_gpu --num_processes 8 -m comfyui_harmonize.commands.benchmark ...

(the command line itself is commands/benchmark.py; this module is the benchmark it runs)

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
from accelerate import PartialState
from PIL import Image
from tqdm.auto import tqdm

from . import dataset as ihd
from ..evaluation import metrics
from ..color.match import lab_color_match
from ..core.dtypes import resolve_dtype
from ..core.errors import InputError
from ..diffharmony.build import build_diffharmony, chosen_refiner
from ..diffharmony import official
from ..diffharmony import pipeline as dh

FIELDS = ("name", "subset", "psnr", "mse", "fmse", "bmse", "fg_ratio", "bucket", "seed")
METHODS = ("diffharmony", "composite", "color_match")
# Published figures for all of iHarmony4 (reference/evaluation.md, reference/diffharmony.md): PSNR, MSE, fMSE.
PUBLISHED = {
    "composite (input), paper": (31.63, 172.47, 1376.42),
    "DiffHarmony 1024 + refine, paper": (40.44, 14.29, 151.42),
    "DiffHarmony 1024 no refine, paper": (40.12, 15.56, 166.19),
    "DiffHarmony 512 + refine, paper": (39.47, 19.59, 205.07),
    "DiffHarmony 512 no refine, paper": (37.65, 26.14, 290.66),
}
Method = Callable[[torch.Tensor, torch.Tensor, int, "ihd.Sample"], torch.Tensor]
PREPROCESS = ("pack", "official")
DECODERS = ("vae", "condition-vae")
PRED_LEVELS = ("round", "truncate")


# ------------------------------------------------------------------------------------------- methods
def build_method(args: argparse.Namespace, device: torch.device) -> Method:
    if args.method == "composite":
        return lambda composite, mask, seed, sample: composite.clone()
    if args.method == "color_match":
        return lambda composite, mask, seed, sample: lab_color_match(composite, mask)
    if args.method == "diffharmony":
        sd, refiner, cvae = build_diffharmony(args.model, refiner=args.refiner, no_refine=args.no_refine,
                                              condition_vae=args.decoder == "condition-vae",
                                              condition_vae_path=args.condition_vae,
                                              dtype=resolve_dtype(args.dtype, device), device=device,
                                              tokenizer_dir=args.tokenizer)

        def run(composite, mask, seed, sample):
            if args.preprocess == "official":  # the authors' loader on the files, their 256 square back
                inputs = official.prepare_files(sample.composite, sample.mask, args.resolution,
                                                args.refine_resolution)
                return official.harmonize(sd, inputs, seed=seed, steps=args.steps, scheduler=args.scheduler,
                                          guidance=args.guidance, refiner=refiner, condition_vae=cvae)
            return dh.harmonize(sd, composite, mask, seed=seed, steps=args.steps, resolution=args.resolution,
                                scheduler=args.scheduler, guidance=args.guidance, square=args.fit == "square",
                                refiner=refiner, refine_resolution=args.refine_resolution, condition_vae=cvae)

        return run
    raise InputError(f"unknown method {args.method!r}; expected one of {', '.join(METHODS)}")


def saved_levels(image: torch.Tensor, levels: str) -> torch.Tensor:
    """The result as the 8-bit file a run saves: ``round`` (the pack's PNGs) or ``truncate`` (the official
    script saves with torchvision's ``to_pil_image``, ``mul(255).byte()``: truncated, about half a level
    low on average)."""
    if levels == "truncate":
        return (image.float() * 255).to(torch.uint8).float() / 255
    return (image.clamp(0, 1) * 255).round() / 255


def run_settings(args: argparse.Namespace) -> dict:
    """What determines the per-image rows (a folder's rows must all come from these settings)."""
    s = {"method": args.method, "split": args.split, "data": str(Path(args.data).resolve()),
         "metric_size": args.metric_size, "quantize": not args.no_quantize, "max_side": args.max_side,
         "seed": args.seed, "pred_levels": args.pred_levels}
    if args.method == "diffharmony":
        refiner = chosen_refiner(args.model, args.refiner, args.no_refine)
        s.update(model=str(Path(args.model).resolve()), refiner=str(refiner.resolve()) if refiner else None,
                 resolution=args.resolution, fit=args.fit, steps=args.steps, scheduler=args.scheduler,
                 guidance=args.guidance, refine_resolution=args.refine_resolution, dtype=args.dtype,
                 preprocess=args.preprocess, decoder=args.decoder,
                 condition_vae=str(Path(args.condition_vae).resolve()) if args.condition_vae else None)
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
    refine = "refine" if chosen_refiner(args.model, args.refiner, args.no_refine) else "no refine"
    return f"DiffHarmony {args.resolution} {args.fit} {refine}, {args.steps} steps"


def save_png(image: torch.Tensor, path: Path) -> None:
    """IMAGE ``[1,H,W,3]`` as an 8-bit PNG; an existing file is left alone (it holds the same result)."""
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
                result = method(d["composite"], d["mask"], seed, s)
                if not args.no_quantize:
                    result = saved_levels(result, args.pred_levels)
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


if __name__ == "__main__":
    print("the benchmark command moved: run `harmonize-benchmark` or `python -m comfyui_harmonize.commands.benchmark` "
          "(also under `accelerate launch ... -m comfyui_harmonize.commands.benchmark`)", file=sys.stderr)
    sys.exit(2)
