"""Mask feather: time against the radius, side by side with the erosion + Gaussian blur it replaced.

    python benchmarks/feather_bench.py [--size 2000x1500] [--radii 0,8,32,128,256] [--old-up-to 32]

The feather is one exact distance transform per image, so its time should not depend on the radius; the
former feather eroded with a (2r+1)^2 kernel (kornia) and blurred with sigma r/2, whose cost grows with
r^2. Prints median seconds per radius for both (the old one only up to ``--old-up-to``: at 256 px it runs
for minutes).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings

import torch

from comfyui_harmonize.pipelines.core import images


def old_feather(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """The former feather (erode by a square of side 2r+1, Gaussian blur sigma r/2, never above the mask)."""
    import kornia

    m = mask[:, None]
    kernel = torch.ones(2 * radius + 1, 2 * radius + 1)
    eroded = kornia.morphology.erosion(m, kernel, border_type="constant", border_value=1.0)
    sigma = max(radius / 2.0, 0.5)
    k = 2 * int(math.ceil(2 * sigma)) + 1
    return torch.minimum(kornia.filters.gaussian_blur2d(eroded, (k, k), (sigma, sigma), border_type="replicate"), m)[:, 0]


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="2000x1500")
    p.add_argument("--radii", default="0,8,32,128,256")
    p.add_argument("--old-up-to", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    mask = ((yy / 0.6) ** 2 + (xx / 0.5) ** 2 <= 1).float()[None]  # an object about 900 px tall
    images.feather_mask(mask, 4)  # import scipy once
    print(f"feather of a {w}x{h} mask, median of {args.repeats}, {torch.get_num_threads()} threads")
    print(f"{'radius':>7} {'distance transform s':>21} {'erosion + blur s':>17}")
    for r in (int(v) for v in args.radii.split(",")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            new = median_seconds(lambda: images.feather_mask(mask, r), args.repeats)
        old = median_seconds(lambda: old_feather(mask, r), 1) if 0 < r <= args.old_up_to else None
        print(f"{r:>7} {new:>21.3f} {('%.3f' % old) if old is not None else '-':>17}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
