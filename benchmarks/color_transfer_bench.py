"""Full-resolution color transfer and 3D LUTs: time and peak memory on a 20-megapixel input, and quality
of transfer vs plain resampling on the real composites.

    python benchmarks/color_transfer_bench.py [--width 5472 --height 3648] [--threads N] [--skip-quality]

Speed/memory: a real photograph (../shared/data/composites/house_composite.png, or scikit-image's
astronaut when the shared data is absent) is upscaled to width x height (20 MP by default) with its mask;
the harmonized image is its color-changed version at 1024 px, blurred. Printed per stage: wall time and
the peak of extra resident memory (Linux VmHWM reset before each stage via /proc/self/clear_refs, minus
the resident memory before it; tracemalloc cannot see torch's allocations, so it is not used).

Quality: each real composite is the ground truth; a known global color change inside its mask makes the
composite; the harmonized result is the ground truth at 1024 px long side with a Gaussian blur (sigma 2
px), as a diffusion stage returns it. Printed at full resolution: PSNR and fMSE (0-255 scale, the
project's metrics module with size=None) and the detail correlation (Laplacian responses inside the eroded
mask) of transfer, resample and the composite itself.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from comfyui_harmonize.pipelines.color import transfer as ct
from comfyui_harmonize.pipelines.core import image_io, images
from comfyui_harmonize.pipelines.color import lut, restore
from comfyui_harmonize.pipelines.evaluation import metrics

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "composites"


# ------------------------------------------------------------------------------------------ memory
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    """Return freed heap memory to the OS (glibc malloc_trim), then reset the peak RSS to the current RSS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def measure(fn, repeats: int = 1):
    """(result, median seconds, peak extra MiB or None) of ``fn()``."""
    times, peaks, out = [], [], None
    for _ in range(repeats):
        out = None
        ok = _reset_peak()
        rss0 = _status_kb("VmRSS")
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        peaks.append((_status_kb("VmHWM") - rss0) / 1024 if ok and rss0 >= 0 else None)
    peak = max(peaks) if all(p is not None for p in peaks) else None
    return out, statistics.median(times), peak


def fmt_peak(p) -> str:
    return f"{p:8.0f} MiB" if p is not None else "     n/a"


# ------------------------------------------------------------------------------------------ inputs
def change(x: torch.Tensor) -> torch.Tensor:
    mix = torch.tensor([[0.9, 0.1, 0.0], [0.05, 0.8, 0.1], [0.0, 0.15, 0.7]])
    y = (x @ mix.T) * torch.tensor([1.1, 0.95, 0.8]) + torch.tensor([0.02, 0.0, 0.05])
    return y.clamp(0, 1) ** 0.8


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    import kornia

    k = 2 * math.ceil(3 * sigma) + 1
    return images.to_nhwc(kornia.filters.gaussian_blur2d(images.to_nchw(x), (k, k), (sigma, sigma))).clamp(0, 1)


def working_size(h: int, w: int, long_side: int = 1024) -> tuple[int, int]:
    s = long_side / max(h, w)
    return round(h * s), round(w * s)


def big_inputs(width: int, height: int):
    if (DATA / "house_composite.png").is_file():
        src = image_io.load_image(DATA / "house_composite.png")
        mask = (image_io.load_mask(DATA / "house_mask.png") >= 0.5).float()
        what = "house_composite.png"
    else:
        import skimage.data

        src = torch.from_numpy(skimage.data.astronaut().copy()).float()[None] / 255
        yy, xx = torch.meshgrid(torch.arange(512.0), torch.arange(512.0), indexing="ij")
        mask = ((((yy - 280) / 200) ** 2 + ((xx - 256) / 170) ** 2) < 1).float()[None]
        what = "scikit-image astronaut"
    composite = images.resize_images(src, (height, width)).contiguous()
    full_mask = (images.resize_masks(mask, (height, width)) >= 0.5).float()
    harmonized = blur(change(images.resize_images(src, working_size(height, width))), 2.0)
    return composite, harmonized, full_mask, what


# ----------------------------------------------------------------------------------------- quality
def detail_correlation(pred, gt, mask) -> float:
    import kornia

    inner = -F.max_pool2d(-mask[:, None], 7, 1, 3)
    sel = (inner > 0.5).expand(-1, 3, -1, -1)
    a = kornia.filters.laplacian(images.to_nchw(pred), 3)[sel].double()
    b = kornia.filters.laplacian(images.to_nchw(gt), 3)[sel].double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def quality(name: str, ext: str) -> tuple[list[tuple], float]:
    gt = image_io.load_image(DATA / f"{name}_composite.{ext}")
    mask = (image_io.load_mask(DATA / f"{name}_mask.{ext}") >= 0.5).float()
    composite = torch.where(mask[..., None] > 0.5, change(gt), gt)
    harmonized = blur(images.resize_images(gt, working_size(*gt.shape[1:3])), 2.0)
    rows = []
    t0 = time.perf_counter()
    transfer = restore.restore(harmonized, composite, mask, detail="transfer")
    t_transfer = time.perf_counter() - t0
    resample = restore.restore(harmonized, composite, mask, detail="resample")
    for label, pred in (("transfer", transfer), ("resample", resample), ("composite", composite)):
        m = metrics.image_metrics(pred, gt, mask, size=None, quantize=False)
        rows.append((name, f"{gt.shape[2]}x{gt.shape[1]}", label, float(m["psnr"][0]), float(m["fmse"][0]),
                     detail_correlation(pred, gt, mask)))
    return rows, t_transfer


def speed(args) -> None:
    composite, harmonized, mask, what = big_inputs(args.width, args.height)
    mp = args.width * args.height / 1e6
    print(f"\n== {args.width}x{args.height} ({mp:.1f} MP) from {what}; harmonized "
          f"{harmonized.shape[2]}x{harmonized.shape[1]}; mask covers {float(mask.mean()) * 100:.0f}%")
    print(f"input composite {composite.numel() * 4 / 2**20:.0f} MiB float32, output the same")
    print("peak extra = peak resident memory during the stage minus before it (new outputs included)")
    print(f"{'stage':44s} {'seconds':>8s} {'peak extra':>12s}")

    def row(label, fn, repeats=args.repeats):
        out, sec, peak = measure(fn, repeats)
        print(f"{label:44s} {sec:8.2f} {fmt_peak(peak)}")
        return out

    row("transfer_color (whole)", lambda: ct.transfer_color(composite, harmonized, mask))
    size = tuple(harmonized.shape[1:3])
    guide = row("  downscale composite + mask to working size",
                lambda: (images.resize_nchw(images.to_nchw(composite), size)[0].clamp(0, 1),
                         images.resize_nchw(mask[:, None], size)[0, 0]))
    target = images.to_nchw(harmonized)[0]
    grid = row("  fit (blur search + local affine models)",
               lambda: ct.fit_local_affine(guide[0], target, guide[1]))
    print(f"    blur found: sigma {grid.blur_sigma} px; grid {tuple(grid.coeffs.shape[1:])}, step {grid.step} px")
    out = torch.zeros_like(composite[0])  # output pages already committed: the row shows working memory
    row("  apply into a preallocated output (strips)", lambda: grid.apply(composite[0], out))
    row("resample baseline (restore detail=resample)",
        lambda: restore.restore(harmonized, composite, mask, detail="resample"))
    row("transfer via restore (detail=transfer)",
        lambda: restore.restore(harmonized, composite, mask, detail="transfer"))
    fg = int((images.resize_masks(mask, size) >= 0.5).sum())
    for n in lut.LUT_SIZES:
        fitted = row(f"fit_lut size {n} ({fg} foreground samples)",
                     lambda n=n: lut.fit_lut(composite, harmonized, mask, size=n))
        print(f"    CG iterations per level {fitted.info['cg_iterations']}, fit RMSE {fitted.info['rmse']:.4f}")
    row(f"apply_lut size {fitted.size} to {mp:.1f} MP", lambda: lut.apply_lut(composite, fitted))
    row(f"apply_lut size {fitted.size} inside the mask", lambda: lut.apply_lut(composite, fitted, mask))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=5472)
    ap.add_argument("--height", type=int, default=3648)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {os.cpu_count()} cores, "
          f"load average {load:.1f}")
    speed(args)  # its 20 MP tensors are freed when it returns
    if args.skip_quality:
        return
    if not DATA.is_dir():
        print(f"\n(quality table skipped: {DATA} not present)")
        return
    print("\n== quality at full resolution (global color change inside the real mask; harmonized = ground "
          "truth at 1024 px, blur sigma 2)")
    print(f"{'image':6s} {'size':>10s} {'output':10s} {'PSNR dB':>8s} {'fMSE':>8s} {'detail corr':>12s}")
    for name, ext in (("house", "png"), ("cat", "png"), ("girl", "jpg")):
        if not (DATA / f"{name}_composite.{ext}").is_file():
            continue
        rows, t = quality(name, ext)
        for r in rows:
            print(f"{r[0]:6s} {r[1]:>10s} {r[2]:10s} {r[3]:8.2f} {r[4]:8.1f} {r[5]:12.3f}")
        print(f"{'':6s} {'':>10s} (transfer took {t:.2f} s)")

if __name__ == "__main__":
    main()
