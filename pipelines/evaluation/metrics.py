"""Harmonization metrics as the field computes them on iHarmony4 (reference/evaluation.md).

Per image, at ``size x size`` (256 by default), RGB values on the 0-255 scale, float64:

- MSE  = mean over all H*W*3 values of (pred - gt)^2
- PSNR = 10 log10(255^2 / MSE)  (fixed peak 255, as DiffHarmony's script and PCT-Net)
- fMSE = sum over mask pixels and channels of (pred - gt)^2 / (3 * number of mask pixels)
- bMSE = the same outside the mask
- fg_ratio = number of mask pixels / (H*W), and its bucket [0,5%), [5%,15%), [15%,100%]

Preprocessing follows DiffHarmony's evaluation script, which reads 8-bit files with PIL:

- images are resized to ``size x size`` (aspect ratio not kept) with antialiased bilinear filtering
  (``F.interpolate(..., antialias=True)``, the filter PIL uses); with ``quantize`` (default) values are
  rounded to 8-bit levels before and after the resize, as an 8-bit file read and resized by PIL is.
  PIL's fixed-point arithmetic can still differ by one level on some pixels;
- the mask is binarised at 0.5 at its own resolution and resized nearest-neighbour (PIL resizes a 1-bit
  image with NEAREST whatever filter is asked for; ``nearest-exact`` samples the same pixels).

Decisions where the definitions leave a gap (documented in the README):

- PSNR of identical images would divide by zero: it is capped at ``PSNR_CAP`` = 100 dB (the value for
  MSE <= 255^2 * 1e-10). At 256x256 on 8-bit levels the cap is reached only by identical images or by
  images that differ by one level in a single value (101.1 dB uncapped); every other pair is below it.
- fMSE of an empty mask and bMSE of a full mask are undefined: they are NaN and left out of averages
  (``summarize`` reports how many values each average is taken over).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core import images
from ..core.errors import InputError

PEAK = 255.0
PSNR_CAP = 100.0
DEFAULT_SIZE = 256
METRICS = ("mse", "psnr", "fmse", "bmse")
# Foreground-ratio buckets of DiffHarmony's evaluation; the last one is closed at 100 %.
BUCKETS = ((0.0, 0.05), (0.05, 0.15), (0.15, 1.0))
BUCKET_LABELS = ("0-5%", "5-15%", "15-100%")


@dataclass(frozen=True)
class Prepared:
    """Images on the 0-255 scale ``[B,H,W,3]`` float64 and the binary mask ``[B,H,W]`` bool."""

    pred: torch.Tensor
    gt: torch.Tensor
    mask: torch.Tensor


def _check_size(size: int | None) -> None:
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise InputError(f"metric size must be a positive integer (256 for the paper's protocol) or None "
                         f"for the images' own size, got {size!r}")


def _to_255(image: torch.Tensor, size: int | None, quantize: bool) -> torch.Tensor:
    x = image.to(torch.float64) * PEAK
    if quantize:
        x = x.round().clamp(0, PEAK)
    if size is not None and tuple(x.shape[1:3]) != (size, size):
        x = F.interpolate(x.permute(0, 3, 1, 2), size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True).permute(0, 2, 3, 1)
        x = x.clamp(0, PEAK)
        if quantize:
            x = x.round()
    return x


def prepare(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, size: int | None = DEFAULT_SIZE,
            quantize: bool = True, threshold: float = 0.5) -> Prepared:
    """Validate IMAGE/IMAGE/MASK (0..1; batches of 1 broadcast) and bring them to the metric size.

    ``pred`` and ``gt`` may have different sizes when ``size`` is given (each is resized to it); with
    ``size=None`` they must have the same size. The mask is taken at ``gt``'s size (a mask of the same
    aspect ratio is resized to it first).
    """
    _check_size(size)
    pred = images.image_batch(pred, "harmonized image")
    gt = images.image_batch(gt, "ground-truth image")
    gh, gw = gt.shape[1:3]
    if size is None and tuple(pred.shape[1:3]) != (gh, gw):  # the images first: the mask is not to blame
        raise InputError(
            f"the harmonized image is {pred.shape[2]}x{pred.shape[1]} but the ground truth is {gw}x{gh}; "
            f"give a metric size (e.g. 256) to compare images of different sizes")
    pred, gt = images.match_batches(pred, gt, ("harmonized", "ground_truth"))
    mask = images.mask_batch(mask, gh, gw, "mask (at the ground truth's size)")
    gt, mask = images.match_batches(gt, mask)
    pred, gt = images.match_batches(pred, gt, ("harmonized", "ground_truth"))
    binary = (mask >= threshold).to(torch.float32)
    if size is not None and (gh, gw) != (size, size):
        binary = F.interpolate(binary[:, None], size=(size, size), mode="nearest-exact")[:, 0]
    return Prepared(_to_255(pred, size, quantize), _to_255(gt, size, quantize), binary > 0.5)


def psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    """10 log10(255^2 / MSE), capped at ``PSNR_CAP`` (identical images give the cap, not infinity)."""
    mse = torch.as_tensor(mse, dtype=torch.float64)
    floor = PEAK ** 2 * 10.0 ** (-PSNR_CAP / 10.0)
    return 10.0 * torch.log10(PEAK ** 2 / mse.clamp_min(floor))


def compute(prepared: Prepared) -> dict[str, torch.Tensor]:
    """Per-image metrics ``[B]`` float64 from prepared tensors."""
    sq = (prepared.pred - prepared.gt) ** 2  # [B,H,W,3]
    m = prepared.mask.to(torch.float64)[..., None]
    n_fg = m.flatten(1).sum(1)
    n_px = float(m.shape[1] * m.shape[2])
    mse = sq.flatten(1).mean(1)
    fg_sum = (sq * m).flatten(1).sum(1)
    bg_sum = (sq * (1 - m)).flatten(1).sum(1)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    fmse = torch.where(n_fg > 0, fg_sum / (3 * n_fg).clamp_min(1), nan)
    n_bg = n_px - n_fg
    bmse = torch.where(n_bg > 0, bg_sum / (3 * n_bg).clamp_min(1), nan)
    return {"mse": mse, "psnr": psnr_from_mse(mse), "fmse": fmse, "bmse": bmse, "fg_ratio": n_fg / n_px}


def image_metrics(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, size: int | None = DEFAULT_SIZE,
                  quantize: bool = True) -> dict[str, torch.Tensor]:
    """MSE, PSNR, fMSE, bMSE and foreground ratio per image (``[B]`` float64 each).

    ``pred``/``gt`` are IMAGE tensors ``[B,H,W,3]`` in 0..1, ``mask`` a MASK ``[B,H,W]``; inputs are not
    modified."""
    return compute(prepare(pred, gt, mask, size=size, quantize=quantize))


def bucket_index(fg_ratio: float) -> int:
    """0, 1 or 2 for the foreground-ratio buckets [0,5%), [5%,15%), [15%,100%]."""
    r = float(fg_ratio)
    if not 0.0 <= r <= 1.0:
        raise InputError(f"foreground ratio must be in [0, 1], got {r}")
    if r < BUCKETS[0][1]:
        return 0
    if r < BUCKETS[1][1]:
        return 1
    return 2


def bucket_label(fg_ratio: float) -> str:
    return BUCKET_LABELS[bucket_index(fg_ratio)]


def _mean(values: list[float]) -> tuple[float, int]:
    finite = [v for v in values if not math.isnan(v)]
    return (math.fsum(finite) / len(finite) if finite else float("nan")), len(finite)


def summarize(rows: list[dict], group: str | None = None) -> dict[str, dict]:
    """Average per-image rows (dicts with the METRICS keys, ``fg_ratio`` and optionally ``subset``).

    Returns ``{group_value: {"count": n, "mse": ..., "psnr": ..., "fmse": ..., "bmse": ..., "n_fmse": ...,
    "n_bmse": ...}}`` with ``"all"`` for all rows; ``group="subset"`` adds one entry per subset and
    ``group="bucket"`` one per foreground-ratio bucket (in the bucket order). NaN values (empty masks) are
    left out of their average; ``n_<metric>`` says over how many images each average was taken.
    """
    groups: dict[str, list[dict]] = {}
    if group == "subset":
        for r in rows:
            groups.setdefault(str(r["subset"]), []).append(r)
        groups = dict(sorted(groups.items()))
    elif group == "bucket":
        groups = {label: [] for label in BUCKET_LABELS}
        for r in rows:
            groups[bucket_label(r["fg_ratio"])].append(r)
    elif group is not None:
        raise InputError(f"group must be None, 'subset' or 'bucket', got {group!r}")
    groups["all"] = list(rows)
    out = {}
    for key, members in groups.items():
        entry: dict = {"count": len(members)}
        for name in METRICS:
            entry[name], entry[f"n_{name}"] = _mean([float(r[name]) for r in members])
        out[key] = entry
    return out


def format_report(values: dict[str, torch.Tensor], size: int | None) -> str:
    """Human-readable lines for a batch (per image, and the mean when there are several)."""
    where = f"{size}x{size}" if size else "native size"
    n = len(values["mse"])
    lines = [f"metrics at {where}, 0-255 scale, PSNR peak 255 (cap {PSNR_CAP:g} dB)"]
    rows = []
    for i in range(n):
        row = {k: float(values[k][i]) for k in (*METRICS, "fg_ratio")}
        rows.append(row)
        prefix = f"image {i}: " if n > 1 else ""
        lines.append(
            f"{prefix}PSNR {row['psnr']:.2f} dB | MSE {row['mse']:.2f} | fMSE {row['fmse']:.2f} | "
            f"bMSE {row['bmse']:.2f} | foreground {100 * row['fg_ratio']:.1f}% ({bucket_label(row['fg_ratio'])})")
    if n > 1:
        s = summarize(rows)["all"]
        lines.append(f"mean of {n}: PSNR {s['psnr']:.2f} dB | MSE {s['mse']:.2f} | fMSE {s['fmse']:.2f} | "
                     f"bMSE {s['bmse']:.2f}")
    return "\n".join(lines)
