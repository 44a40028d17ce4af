"""Command line: harmonize one composite, or a folder of composites, with DiffHarmony.

    comfyui-harmonize MODEL COMPOSITE MASK -o OUT [options]
    comfyui-harmonize --method color-match COMPOSITE MASK -o OUT [options]

MODEL is the DiffHarmony archive folder as downloaded (its refinement/ is used automatically), a diffusers
inpainting folder or a single-file inpainting checkpoint. COMPOSITE and MASK are image files, or folders in
which each composite ``name.ext`` has a mask ``name.ext`` / ``name_mask.ext`` in the mask folder. OUT is a
file (single image) or a folder. Existing files are never overwritten.

``--method color-match`` needs no weights and no MODEL: a classical baseline (Reinhard's colour transfer in
Lab, the foreground's colour statistics matched to the background's), NOT DiffHarmony. It runs at
``--resolution`` and is applied to the full-resolution composite with ``--detail transfer`` (the default
for this method).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ..pipelines.diffharmony import pipeline as dh
from ..pipelines.core import image_io
from ..pipelines.core.errors import InputError, WeightsError
from ..pipelines.color.restore import DETAIL_MODES

METHODS = ("diffharmony", "color-match")
DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="comfyui-harmonize", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("paths", nargs="+", metavar="[MODEL] COMPOSITE MASK",
                   help="MODEL (DiffHarmony archive folder, diffusers inpainting folder or .safetensors "
                        "checkpoint; not with --method color-match), the composite image or folder of "
                        "composites, the mask image (white = foreground) or folder of masks")
    p.add_argument("--method", choices=METHODS, default="diffharmony",
                   help="diffharmony (needs MODEL) or color-match (no weights: a classical Lab colour "
                        "statistics match, not DiffHarmony)")
    p.add_argument("-o", "--output", required=True, help="output file, or folder for folder input")
    p.add_argument("--refiner", help="refinement folder (default: MODEL/refinement when it exists)")
    p.add_argument("--no-refine", action="store_true", help="skip the refinement stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=dh.DEFAULT_STEPS)
    p.add_argument("--scheduler", choices=dh.SCHEDULERS, default="euler_ancestral")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--resolution", type=int, default=dh.DEFAULT_RESOLUTION, help="working resolution (long side)")
    p.add_argument("--square", action="store_true", help="resize to a square as the official code does")
    p.add_argument("--refine-resolution", type=int, default=256)
    p.add_argument("--feather", type=int, default=0)
    p.add_argument("--detail", choices=DETAIL_MODES, help="resample or transfer (default: resample for "
                   "diffharmony, transfer for color-match)")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer", help="folder with the CLIP vocab.json + merges.txt (single-file checkpoints); "
                                       "default: $COMFYUI_PATH/comfy/sd1_tokenizer")
    args = p.parse_args(argv)
    wanted = 2 if args.method == "color-match" else 3
    if len(args.paths) != wanted:
        p.error(f"--method {args.method} takes {'COMPOSITE MASK' if wanted == 2 else 'MODEL COMPOSITE MASK'}, "
                f"got {len(args.paths)} path(s): {' '.join(args.paths)}")
    args.model = args.paths[0] if wanted == 3 else None
    args.composite, args.mask = args.paths[-2:]
    if args.detail is None:
        args.detail = "transfer" if args.method == "color-match" else "resample"
    return args


def find_mask(composite: Path, mask_dir: Path) -> Path:
    for stem in (composite.stem, composite.stem + "_mask"):
        for suffix in image_io.IMAGE_SUFFIXES:
            cand = mask_dir / (stem + suffix)
            if cand.is_file():
                return cand
    raise InputError(f"no mask for {composite.name} in {mask_dir} (expected {composite.stem}.png or "
                     f"{composite.stem}_mask.png, or another image suffix)")


def jobs(args) -> list[tuple[Path, Path, Path]]:
    comp, mask, out = Path(args.composite), Path(args.mask), Path(args.output)
    if comp.is_dir():
        if not mask.is_dir():
            raise InputError(f"{comp} is a folder, so the mask argument must be a folder too, got {mask}")
        files = sorted(f for f in comp.iterdir() if f.suffix.lower() in image_io.IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"no images in {comp}")
        return [(f, find_mask(f, mask), out / (f.stem + ".png")) for f in files]
    if out.is_dir():
        out = out / (comp.stem + "_harmonized.png")
    return [(comp, mask, out)]


def color_match(args, work) -> None:
    """The weight-free baseline on every job (pipelines/color/match.py)."""
    from ..pipelines.color.match import harmonize_color_match

    for comp, mask, out in work:
        result = harmonize_color_match(image_io.load_image(comp), image_io.load_mask(mask),
                                       resolution=args.resolution, feather=args.feather, detail=args.detail)
        written = image_io.save_image(result, out)
        print(f"{comp} -> {written} (color-match: a classical Lab colour statistics match, not DiffHarmony)")


def diffharmony(args, work) -> None:
    from tqdm import tqdm

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] or (torch.float16 if device.type == "cuda" else torch.float32)
    comfy = os.environ.get("COMFYUI_PATH")
    tokenizer = args.tokenizer or (os.path.join(comfy, "comfy", "sd1_tokenizer") if comfy else None)
    sd = dh.load_diffharmony(args.model, dtype=dtype, tokenizer_dir=tokenizer)
    for m in sd.modules().values():
        m.to(device)
    refiner = None
    ref_path = args.refiner or (Path(args.model) / "refinement" if (Path(args.model) / "refinement").is_dir() else None)
    if ref_path and not args.no_refine:
        from ..pipelines.diffharmony.refiner import load_refiner

        refiner = load_refiner(ref_path, dtype).to(device)
    bar = tqdm(total=len(work) * args.steps, unit="step", disable=None)
    for comp, mask, out in work:
        bar.set_description(comp.name)
        result = dh.harmonize(sd, image_io.load_image(comp), image_io.load_mask(mask), seed=args.seed,
                              steps=args.steps, resolution=args.resolution, scheduler=args.scheduler,
                              guidance=args.guidance, square=args.square, refiner=refiner,
                              refine_resolution=args.refine_resolution, feather=args.feather,
                              detail=args.detail, callback=lambda i, n: bar.update(1))
        written = image_io.save_image(result, out)
        bar.write(f"{comp} -> {written}")
    bar.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        work = jobs(args)
        (color_match if args.method == "color-match" else diffharmony)(args, work)
    except (InputError, WeightsError) as exc:
        print(f"comfyui-harmonize: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
