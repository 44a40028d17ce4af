"""Command line: harmonize one composite, or a folder of composites, with DiffHarmony.

    comfyui-harmonize MODEL COMPOSITE MASK -o OUT [options]
    comfyui-harmonize --method color-match COMPOSITE MASK -o OUT [options]

MODEL is the DiffHarmony archive folder as downloaded (its refinement/ is used automatically), a diffusers
inpainting folder or a single-file inpainting checkpoint. COMPOSITE and MASK are image files, or folders in
which each composite ``name.ext`` has a mask ``name.ext`` / ``name_mask.ext`` in the mask folder. OUT is a
file (single image) or a folder. Existing files are never overwritten: a single output that exists gets a
numbered name (``out_1.png``); in folder mode a composite whose output already exists is skipped, so a run
that stopped can be started again (``--no-skip-existing`` computes it again, under a numbered name).

Every argument is checked before any model is loaded or image computed; a user error prints one message
and exits with code 2 (no traceback).

``--method color-match`` needs no weights and no MODEL: a classical baseline (Reinhard's colour transfer in
Lab, the foreground's colour statistics matched to the background's), NOT DiffHarmony. It runs at
``--resolution`` and is applied to the full-resolution composite with ``--detail transfer`` (the default
for this method).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..pipelines.color.match import harmonize_color_match
from ..pipelines.color.restore import DETAIL_MODES
from ..pipelines.core import image_io, images
from ..pipelines.core.dtypes import DTYPES, resolve_dtype
from ..pipelines.core.errors import InputError, WeightsError
from ..pipelines.diffharmony import pipeline as dh
from ..pipelines.diffharmony.build import build_diffharmony
from .common import DTYPE_HELP, check_device, fail, tokenizer_dir

METHODS = ("diffharmony", "color-match")
DECODERS = ("vae", "condition-vae")


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
    p.add_argument("--decoder", choices=DECODERS, default="vae",
                   help="vae: the model's VAE decodes; condition-vae: the archive's condition_vae/ decodes while "
                        "also seeing the composite (keeps fine detail)")
    p.add_argument("--condition-vae", help="condition_vae/ folder for --decoder condition-vae (default: beside "
                                           "MODEL's base/)")
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
    p.add_argument("--dtype", choices=list(DTYPES), default="auto", help=DTYPE_HELP)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer", help="folder with the CLIP vocab.json + merges.txt (single-file checkpoints); "
                                       "default: $COMFYUI_PATH/comfy/sd1_tokenizer")
    p.add_argument("--skip-existing", action=argparse.BooleanOptionalAction, default=True,
                   help="folder mode: skip composites whose output file already exists (default), so a stopped "
                        "run can be resumed; --no-skip-existing computes them again under numbered names")
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


# ------------------------------------------------------------------------------------ argument checks
MAX_STEPS = 1000  # Stable Diffusion's schedulers are trained on 1000 timesteps; more steps than that fail
MAX_RESOLUTION = 16384
MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds
# Memory model for the largest working resolution: float32 RGB copies of the working image alive at once
# (resized input, the copy on the device, the decoded result, the upscaled paste) with headroom; the VAE
# runs in tiles above 2048 px, so the image buffers dominate there.
BYTES_PER_WORKING_PIXEL = 64


def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` (CUDA: the driver's figure; CPU: available physical memory), None if unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu" and hasattr(os, "sysconf"):
            return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, RuntimeError):
        return None
    return None


def largest_resolution(free_bytes: int, aspect: float) -> int:
    """The largest working long side (multiple of 8) whose image buffers fit in ``free_bytes`` for an image of
    aspect ratio ``aspect`` (long side / short side >= 1)."""
    long_side = math.sqrt(free_bytes / BYTES_PER_WORKING_PIXEL * aspect)
    return max(0, int(long_side) // 8 * 8)


def check_output(args, folder_mode: bool) -> None:
    out = Path(args.output)
    if folder_mode:
        if out.exists() and not out.is_dir():
            raise InputError(f"--output {out} is a file, but a folder of composites needs an output folder")
        folder = out
    elif out.is_dir():
        folder = out
    else:
        if out.suffix.lower() not in image_io.IMAGE_SUFFIXES:
            raise InputError(f"--output {out}: {out.suffix or 'no extension'} is not an image format this command "
                             f"writes; expected a file ending in {', '.join(image_io.IMAGE_SUFFIXES)} or an "
                             f"existing folder")
        folder = out.parent
    existing = folder
    while not existing.exists():  # the folders that do not exist yet are created: check the first that does
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise InputError(f"--output {out}: {existing} is a file, so the folder {folder} cannot be created there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--output {out}: the folder {existing} is not writable")


def check_numbers(args) -> None:
    if not 0 <= args.seed <= MAX_SEED:
        raise InputError(f"--seed {args.seed} is out of range; expected 0..{MAX_SEED} (2**64 - 1)")
    if not 1 <= args.steps <= MAX_STEPS:
        raise InputError(f"--steps {args.steps} is out of range; expected 1..{MAX_STEPS} (the schedulers' training "
                         f"timesteps; DiffHarmony uses 5)")
    if not (math.isfinite(args.guidance) and args.guidance >= 1.0):
        raise InputError(f"--guidance {args.guidance} is out of range; expected a number >= 1 (1 = off, the paper's)")
    if not 0 <= args.feather <= MAX_RESOLUTION:
        raise InputError(f"--feather {args.feather} is out of range; expected 0..{MAX_RESOLUTION} pixels")
    if args.refine_resolution % 16 or not 16 <= args.refine_resolution <= MAX_RESOLUTION:
        raise InputError(f"--refine-resolution {args.refine_resolution}: expected a multiple of 16 in "
                         f"16..{MAX_RESOLUTION} (the paper: 256)")
    if args.resolution % 8 or not 64 <= args.resolution <= MAX_RESOLUTION:
        raise InputError(f"--resolution {args.resolution}: expected a multiple of 8 in 64..{MAX_RESOLUTION} "
                         f"(the paper: 1024)")


def check_memory(args, device: torch.device, sizes: list[tuple[int, int]]) -> None:
    """Refuse a working resolution whose image buffers cannot fit, naming the largest that does."""
    free = available_memory(device)
    if free is None or not sizes:
        return
    aspect = max(max(h, w) / max(min(h, w), 1) for h, w in sizes)
    short = args.resolution if args.square else math.ceil(args.resolution / aspect)
    need = args.resolution * short * BYTES_PER_WORKING_PIXEL
    if need > free:
        best = largest_resolution(free, 1.0 if args.square else aspect)
        raise InputError(f"--resolution {args.resolution} needs about {need / 2**30:.1f} GiB for the working image "
                         f"buffers alone, but {device} has {free / 2**30:.1f} GiB free; the largest working "
                         f"resolution that fits is about {best}")


def check_inputs(args, work) -> list[tuple[int, int]]:
    """Every composite and mask opens, and each mask fits its composite (same size or aspect ratio)."""
    sizes = []
    for comp, mask, _ in work:
        ch, cw = image_io.image_size(comp, "composite")
        mh, mw = image_io.image_size(mask, "mask")
        if (mh, mw) != (ch, cw) and abs((mw / mh) / (cw / ch) - 1.0) > images.ASPECT_TOLERANCE:
            raise InputError(f"mask {mask} is {mw}x{mh} (WxH) but composite {comp} is {cw}x{ch}: expected a mask "
                             f"of the composite's size (or its aspect ratio)")
        sizes.append((ch, cw))
    return sizes


def check_model_paths(args) -> None:
    if args.model is not None and not Path(args.model).exists():
        raise InputError(f"model not found: {args.model} (expected the DiffHarmony archive folder, a diffusers "
                         f"inpainting folder or a .safetensors checkpoint)")
    for flag, value in (("--refiner", args.refiner), ("--tokenizer", args.tokenizer)):
        if value and not Path(value).is_dir():
            raise InputError(f"{flag} {value}: folder not found")


def validate(args):
    """All checks that need no model, before any work: paths, numbers, device, memory, input files.
    Returns the jobs to run (folder mode: without those whose output exists, unless --no-skip-existing)."""
    check_model_paths(args)
    device = check_device(args.device)
    check_numbers(args)
    folder_mode = Path(args.composite).is_dir()
    check_output(args, folder_mode)
    work = jobs(args)
    if folder_mode and args.skip_existing:
        done = [out for _, _, out in work if out.exists()]
        if done:
            print(f"skipping {len(done)} composite(s) whose output already exists in {args.output} "
                  f"(--no-skip-existing computes them again)")
        work = [job for job in work if not job[2].exists()]
    sizes = check_inputs(args, work)
    check_memory(args, device, sizes)
    return work


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
    for comp, mask, out in work:
        result = harmonize_color_match(image_io.load_image(comp), image_io.load_mask(mask),
                                       resolution=args.resolution, feather=args.feather, detail=args.detail)
        written = image_io.save_image(result, out)
        print(f"{comp} -> {written} (color-match: a classical Lab colour statistics match, not DiffHarmony)")


def diffharmony(args, work) -> None:
    device = torch.device(args.device)
    sd, refiner, cvae = build_diffharmony(args.model, refiner=args.refiner, no_refine=args.no_refine,
                                          condition_vae=args.decoder == "condition-vae",
                                          condition_vae_path=args.condition_vae,
                                          dtype=resolve_dtype(args.dtype, device), device=device,
                                          tokenizer_dir=tokenizer_dir(args.tokenizer))
    bar = tqdm(total=len(work) * args.steps, unit="step", disable=None)
    for comp, mask, out in work:
        bar.set_description(comp.name)
        result = dh.harmonize(sd, image_io.load_image(comp), image_io.load_mask(mask), seed=args.seed,
                              steps=args.steps, resolution=args.resolution, scheduler=args.scheduler,
                              guidance=args.guidance, square=args.square, refiner=refiner,
                              refine_resolution=args.refine_resolution, feather=args.feather,
                              detail=args.detail, callback=lambda i, n: bar.update(1), condition_vae=cvae)
        written = image_io.save_image(result, out)
        bar.write(f"{comp} -> {written}")
    bar.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        work = validate(args)
        if work:
            (color_match if args.method == "color-match" else diffharmony)(args, work)
    except (InputError, WeightsError) as exc:
        return fail("comfyui-harmonize", exc)
    except PermissionError as exc:
        print(f"comfyui-harmonize: error: permission denied: {exc.filename or exc}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print(f"comfyui-harmonize: error: out of memory on {args.device} at --resolution {args.resolution}; try a "
              f"smaller --resolution", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("comfyui-harmonize: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
