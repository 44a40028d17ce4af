"""Metrics against a direct numpy computation of the written definitions (reference/evaluation.md)."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from comfyui_harmonize.nodes.evaluation import HarmonizeMetrics
from comfyui_harmonize.pipelines.evaluation import metrics
from comfyui_harmonize.pipelines.core.errors import InputError

COMPOSITES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "composites"


def ref_metrics(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> dict:
    """The definitions, word for word: arrays on the 0-255 scale [H,W,3], mask [H,W] binarised at 0.5."""
    pred, gt = pred.astype(np.float64), gt.astype(np.float64)
    m = mask >= 0.5
    err = (pred - gt) ** 2
    mse = err.mean()
    fmse = err[m].sum() / (3 * m.sum())
    bmse = err[~m].sum() / (3 * (~m).sum())
    return {"mse": mse, "psnr": 10 * math.log10(255.0 ** 2 / mse), "fmse": fmse, "bmse": bmse,
            "fg_ratio": m.sum() / m.size}


def as_image(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32) / 255.0)[None]


def assert_close(ours: dict, ref: dict, i: int = 0, tol: float = 1e-6):
    for k, v in ref.items():
        assert float(ours[k][i]) == pytest.approx(v, rel=tol, abs=tol), k


def test_random_images_match_definitions_at_256():
    rng = np.random.default_rng(0)
    for trial in range(3):
        pred = rng.integers(0, 256, (256, 256, 3))
        gt = rng.integers(0, 256, (256, 256, 3))
        mask = np.zeros((256, 256), np.float32)
        mask[30:30 + 20 * (trial + 1), 50:160] = 1
        ours = metrics.image_metrics(as_image(pred), as_image(gt), torch.from_numpy(mask)[None])
        assert_close(ours, ref_metrics(pred, gt, mask))


def test_unquantized_float_images_and_native_size():
    rng = np.random.default_rng(1)
    pred = rng.random((37, 53, 3)) * 255
    gt = rng.random((37, 53, 3)) * 255
    mask = rng.random((37, 53))
    ours = metrics.image_metrics(torch.from_numpy(pred / 255)[None], torch.from_numpy(gt / 255)[None],
                                 torch.from_numpy(mask)[None], size=None, quantize=False)
    assert_close(ours, ref_metrics(pred, gt, mask))


def test_resize_path_follows_the_official_pil_preprocessing():
    """Images resized with PIL bilinear (antialiased) on 8-bit data, mask as a 1-bit image (PIL resizes it
    nearest): our mask is the same pixel for pixel, and the metrics agree within PIL's 8-bit rounding."""
    rng = np.random.default_rng(2)
    h, w = 300, 411
    yy, xx = np.mgrid[0:h, 0:w]
    gt = np.clip(127 + 60 * np.sin(xx / 17.0)[..., None] * np.cos(yy / 23.0)[..., None] + rng.normal(0, 8, (h, w, 3)),
                 0, 255).astype(np.uint8)
    pred = np.clip(gt.astype(np.float64) * 0.9 + 12 + rng.normal(0, 3, (h, w, 3)), 0, 255).astype(np.uint8)
    mask = ((xx - 200) ** 2 + (yy - 140) ** 2 < 70 ** 2).astype(np.uint8) * 255
    size = 256
    pil = lambda a: np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR))  # noqa: E731
    pil_mask = np.asarray(Image.fromarray(mask).convert("1").resize((size, size), Image.BILINEAR))
    prepared = metrics.prepare(as_image(pred), as_image(gt), torch.from_numpy(mask / 255.0)[None], size=size)
    assert np.array_equal(prepared.mask[0].numpy(), pil_mask)
    assert np.abs(prepared.gt[0].numpy() - pil(gt)).max() <= 1.0
    ref = ref_metrics(pil(pred), pil(gt), pil_mask.astype(np.float32))
    ours = metrics.compute(prepared)
    for k in ("mse", "fmse", "bmse"):
        assert float(ours[k][0]) == pytest.approx(ref[k], rel=0.03), k
    assert float(ours["psnr"][0]) == pytest.approx(ref["psnr"], abs=0.1)
    assert float(ours["fg_ratio"][0]) == pytest.approx(ref["fg_ratio"], abs=1e-12)
    # and the metrics of what we prepared are the definitions to 1e-6
    assert_close(ours, ref_metrics(prepared.pred[0].numpy(), prepared.gt[0].numpy(), prepared.mask[0].numpy()))


def _real_pair(name: str, size: int | None = None):
    comp = Image.open(COMPOSITES / f"{name}_composite.png").convert("RGB")
    mask = Image.open(COMPOSITES / f"{name}_mask.png").convert("L")
    if size:
        comp = comp.resize((size, size), Image.BILINEAR)
        mask = mask.convert("1").resize((size, size)).convert("L")
    comp = np.asarray(comp)
    # a "harmonized" version: a colour change inside the mask, as a harmonizer would make
    m = np.asarray(mask) >= 128
    pred = comp.astype(np.float64)
    pred[m] = np.clip(pred[m] * np.array([1.08, 0.95, 0.9]) + 5, 0, 255)
    return pred.round().astype(np.uint8), comp, np.asarray(mask).astype(np.float32) / 255.0


@pytest.mark.skipif(not COMPOSITES.is_dir(), reason="../shared/data/composites is absent (real test images)")
@pytest.mark.parametrize("name", ["cat", "house"])
def test_real_images_match_definitions(name):
    pred, gt, mask = _real_pair(name)  # native 1280x859
    ours = metrics.image_metrics(as_image(pred), as_image(gt), torch.from_numpy(mask)[None], size=None)
    assert_close(ours, ref_metrics(pred, gt, mask))
    pred, gt, mask = _real_pair(name, size=256)  # already at the protocol size: no resize happens
    ours = metrics.image_metrics(as_image(pred), as_image(gt), torch.from_numpy(mask)[None])
    assert_close(ours, ref_metrics(pred, gt, mask))
    assert float(ours["bmse"][0]) == 0.0 and float(ours["fmse"][0]) > 0


def test_identical_images_give_the_documented_psnr_cap_without_warnings():
    img = torch.rand(2, 40, 30, 3)
    mask = torch.zeros(2, 40, 30)
    mask[:, 10:20, 5:15] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = metrics.image_metrics(img, img, mask)
    assert out["psnr"].tolist() == [metrics.PSNR_CAP] * 2
    assert out["mse"].tolist() == [0.0, 0.0] and out["fmse"].tolist() == [0.0, 0.0]
    assert float(metrics.psnr_from_mse(torch.tensor(1.0))) == pytest.approx(20 * math.log10(255))
    # one 8-bit level in a single value of a 256x256 image (101.1 dB uncapped) reaches the cap; more does not
    smallest = torch.tensor(1.0 / (256 * 256 * 3), dtype=torch.float64)
    assert float(metrics.psnr_from_mse(smallest)) == metrics.PSNR_CAP
    assert float(metrics.psnr_from_mse(2 * smallest)) < metrics.PSNR_CAP


def test_empty_and_full_masks_give_nan_that_summaries_skip():
    rng = torch.Generator().manual_seed(0)
    pred, gt = torch.rand(2, 16, 16, 3, generator=rng), torch.rand(2, 16, 16, 3, generator=rng)
    mask = torch.stack([torch.zeros(16, 16), torch.ones(16, 16)])
    out = metrics.image_metrics(pred, gt, mask, size=None)
    assert math.isnan(out["fmse"][0]) and not math.isnan(out["bmse"][0])
    assert math.isnan(out["bmse"][1]) and not math.isnan(out["fmse"][1])
    rows = [{k: float(out[k][i]) for k in (*metrics.METRICS, "fg_ratio")} for i in range(2)]
    s = metrics.summarize(rows)["all"]
    assert s["count"] == 2 and s["n_fmse"] == 1 and s["n_bmse"] == 1
    assert s["fmse"] == pytest.approx(rows[1]["fmse"]) and s["bmse"] == pytest.approx(rows[0]["bmse"])
    assert s["mse"] == pytest.approx((rows[0]["mse"] + rows[1]["mse"]) / 2)


@pytest.mark.parametrize("ratio,index", [(0.0, 0), (0.0499, 0), (0.05, 1), (0.1499, 1), (0.15, 2), (1.0, 2)])
def test_foreground_buckets(ratio, index):
    assert metrics.bucket_index(ratio) == index
    assert metrics.bucket_label(ratio) == metrics.BUCKET_LABELS[index]


def test_bucket_and_subset_summaries():
    rows = [{"mse": 1.0, "psnr": 40.0, "fmse": 10.0, "bmse": 0.5, "fg_ratio": 0.01, "subset": "HCOCO"},
            {"mse": 3.0, "psnr": 30.0, "fmse": 30.0, "bmse": 1.5, "fg_ratio": 0.10, "subset": "HCOCO"},
            {"mse": 5.0, "psnr": 20.0, "fmse": 50.0, "bmse": 2.5, "fg_ratio": 0.50, "subset": "HFlickr"}]
    by_bucket = metrics.summarize(rows, "bucket")
    assert [by_bucket[b]["count"] for b in metrics.BUCKET_LABELS] == [1, 1, 1]
    assert by_bucket["5-15%"]["fmse"] == 30.0 and by_bucket["all"]["mse"] == 3.0
    by_subset = metrics.summarize(rows, "subset")
    assert by_subset["HCOCO"]["psnr"] == 35.0 and by_subset["HFlickr"]["count"] == 1
    with pytest.raises(InputError):
        metrics.bucket_index(1.5)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 12), st.integers(2, 12))
def test_mse_is_the_pixel_weighted_mix_of_fmse_and_bmse(seed, h, w):
    g = torch.Generator().manual_seed(seed)
    pred, gt = torch.rand(1, h, w, 3, generator=g), torch.rand(1, h, w, 3, generator=g)
    mask = (torch.rand(1, h, w, generator=g) > 0.5).float()
    out = metrics.image_metrics(pred, gt, mask, size=None)
    r = float(out["fg_ratio"][0])
    f = 0.0 if r == 0 else float(out["fmse"][0]) * r
    b = 0.0 if r == 1 else float(out["bmse"][0]) * (1 - r)
    assert float(out["mse"][0]) == pytest.approx(f + b, rel=1e-9, abs=1e-9)


def test_batches_broadcast_and_inputs_are_untouched():
    g = torch.Generator().manual_seed(3)
    preds, gt = torch.rand(3, 20, 24, 3, generator=g), torch.rand(1, 20, 24, 3, generator=g)
    mask = (torch.rand(20, 24, generator=g) > 0.7).float()
    copies = [t.clone() for t in (preds, gt, mask)]
    out = metrics.image_metrics(preds, gt, mask, size=None)
    assert out["mse"].shape == (3,)
    for i in range(3):
        single = metrics.image_metrics(preds[i:i + 1], gt, mask, size=None)
        assert float(single["fmse"][0]) == float(out["fmse"][i])
    for t, c in zip((preds, gt, mask), copies):
        assert torch.equal(t, c)


def test_errors_name_the_problem():
    a, b = torch.rand(1, 20, 20, 3), torch.rand(1, 30, 30, 3)
    with pytest.raises(InputError, match="different sizes"):
        metrics.image_metrics(a, b, torch.ones(1, 30, 30), size=None)
    with pytest.raises(InputError, match="batch mismatch"):
        metrics.image_metrics(torch.rand(2, 8, 8, 3), torch.rand(3, 8, 8, 3), torch.ones(1, 8, 8))
    with pytest.raises(InputError, match="metric size"):
        metrics.image_metrics(a, a, torch.ones(1, 20, 20), size=-3)
    with pytest.raises(InputError, match="aspect"):
        metrics.image_metrics(a, a, torch.ones(1, 20, 50))


def test_node_shows_and_returns_the_figures():
    g = torch.Generator().manual_seed(4)
    pred, gt = torch.rand(2, 64, 48, 3, generator=g), torch.rand(2, 64, 48, 3, generator=g)
    mask = torch.zeros(1, 64, 48)
    mask[:, 10:40, 10:30] = 1
    out = HarmonizeMetrics().measure(pred, gt, mask, size=256, quantize=True)
    report, psnr, mse, fmse, bmse = out["result"]
    assert out["ui"]["text"] == [report]
    ref = metrics.image_metrics(pred, gt, mask)
    assert mse == pytest.approx(float(ref["mse"].mean())) and psnr == pytest.approx(float(ref["psnr"].mean()))
    assert fmse == pytest.approx(float(ref["fmse"].mean())) and bmse == pytest.approx(float(ref["bmse"].mean()))
    assert "image 1" in report and "mean of 2" in report and f"{psnr:.2f}" in report
    types = HarmonizeMetrics.INPUT_TYPES()["required"]
    assert all("tooltip" in spec[1] for spec in types.values())
    native = HarmonizeMetrics().measure(pred, gt, mask, size=0, quantize=False)["result"]
    ref = metrics.image_metrics(pred, gt, mask, size=None, quantize=False)
    assert native[2] == pytest.approx(float(ref["mse"].mean()))
