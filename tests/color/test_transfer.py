"""Full-resolution color transfer (pipelines/color/transfer.py) on real photographs.

Protocol (issue 6): a real photo is the ground truth; a known color change inside a mask makes the
composite; the "harmonized" result a diffusion stage would return is the ground truth downscaled and
blurred. At full resolution the transfer must beat plain upsampling clearly (PSNR, fMSE) and keep the
original's high-frequency detail, measured as the correlation of Laplacian responses inside the mask.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from comfyui_harmonize.pipelines.color import transfer as ct
from comfyui_harmonize.pipelines.core import image_io, images
from comfyui_harmonize.pipelines.evaluation import metrics
from comfyui_harmonize.pipelines.color import restore
from comfyui_harmonize.pipelines.core.errors import InputError

COMPOSITES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "composites"



# ------------------------------------------------------------------------------------------ helpers
def photo(name: str) -> torch.Tensor:
    skdata = pytest.importorskip("skimage.data", reason="scikit-image (test extra) ships the sample photos")
    arr = getattr(skdata, name)()
    return torch.from_numpy(arr.copy()).float()[None] / 255.0


def ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return ((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) < 1).float()[None]


def global_change(x: torch.Tensor) -> torch.Tensor:
    """A known global color change: channel mixing, gains, offset and a gamma."""
    mix = torch.tensor([[0.9, 0.1, 0.0], [0.05, 0.8, 0.1], [0.0, 0.15, 0.7]])
    y = (x @ mix.T) * torch.tensor([1.1, 0.95, 0.8]) + torch.tensor([0.02, 0.0, 0.05])
    return y.clamp(0, 1) ** 0.8


def lighting_change(x: torch.Tensor) -> torch.Tensor:
    """A spatially varying change: colored light falling off across the image, then a gamma."""
    h, w = x.shape[1:3]
    xx = torch.linspace(0, 1, w)[None, None, :, None]
    yy = torch.linspace(0, 1, h)[None, :, None, None]
    light = torch.cat([(0.7 + 0.5 * xx).expand(1, h, w, 1), (0.8 + 0.3 * yy).expand(1, h, w, 1),
                       (1.1 - 0.4 * xx * yy)], -1)
    return (x * light).clamp(0, 1) ** 1.1


def make_case(gt, mask, change, long_side, sigma):
    """Composite = ground truth with ``change`` inside the mask; harmonized = the ground truth at
    ``long_side`` (antialiased) with a Gaussian blur, as a diffusion stage returns it."""
    import kornia

    composite = torch.where(mask[..., None] > 0.5, change(gt), gt)
    h, w = gt.shape[1:3]
    s = long_side / max(h, w)
    small = images.resize_images(gt, (round(h * s), round(w * s)))
    k = 2 * math.ceil(3 * sigma) + 1
    harmonized = images.to_nhwc(kornia.filters.gaussian_blur2d(images.to_nchw(small), (k, k), (sigma, sigma)))
    return composite, harmonized.clamp(0, 1)


def laplacian(x: torch.Tensor) -> torch.Tensor:
    import kornia

    return kornia.filters.laplacian(images.to_nchw(x), 3)


class Detail:
    """High-frequency detail of a reference image inside a mask (eroded by 3 px so the mask edge does not
    count): the 3x3 Laplacian responses of all channels. ``correlation(pred)`` is the correlation of
    ``pred``'s responses with the reference's (1 = the same edges and texture), ``energy_ratio(pred)`` the
    ratio of their norms (1 = as much detail, not more, not less)."""

    def __init__(self, reference: torch.Tensor, mask: torch.Tensor):
        inner = -F.max_pool2d(-mask[:, None], 7, 1, 3)
        self.sel = (inner > 0.5).expand(-1, 3, -1, -1)
        self.ref = laplacian(reference)[self.sel].double()

    def correlation(self, pred: torch.Tensor) -> float:
        a, b = laplacian(pred)[self.sel].double(), self.ref
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    def energy_ratio(self, pred: torch.Tensor) -> float:
        return float(laplacian(pred)[self.sel].double().norm() / self.ref.norm())


def full_res_metrics(pred, gt, mask) -> tuple[float, float]:
    m = metrics.image_metrics(pred, gt, mask, size=None, quantize=False)
    return float(m["psnr"][0]), float(m["fmse"][0])


def assert_transfer_beats_resample(gt, mask, composite, harmonized):
    transfer = restore.restore(harmonized, composite, mask, detail="transfer")
    resample = restore.restore(harmonized, composite, mask, detail="resample")
    psnr_t, fmse_t = full_res_metrics(transfer, gt, mask)
    psnr_r, fmse_r = full_res_metrics(resample, gt, mask)
    detail = Detail(gt, mask)
    corr_t, corr_r = detail.correlation(transfer), detail.correlation(resample)
    report = (f"transfer PSNR {psnr_t:.2f} fMSE {fmse_t:.1f} detail {corr_t:.3f} | "
              f"resample PSNR {psnr_r:.2f} fMSE {fmse_r:.1f} detail {corr_r:.3f}")
    assert psnr_t > psnr_r + 6.0, report
    assert fmse_t < 0.25 * fmse_r, report
    assert corr_t > 0.9, report
    assert corr_r < 0.7, report
    assert 0.8 < detail.energy_ratio(transfer) < 1.25, report
    assert torch.equal(transfer[mask[..., None].expand_as(transfer) == 0],
                       composite[mask[..., None].expand_as(composite) == 0])  # background bit for bit
    return psnr_t, psnr_r


# ----------------------------------------------------------------------------------- real photographs
@pytest.mark.parametrize("name,change", [("astronaut", global_change), ("coffee", lighting_change)])
def test_transfer_restores_detail_on_sample_photos(name, change):
    gt = photo(name)
    h, w = gt.shape[1:3]
    mask = ellipse(h, w, 0.55 * h, 0.5 * w, 0.38 * h, 0.32 * w)
    composite, harmonized = make_case(gt, mask, change, long_side=max(h, w) // 4, sigma=1.5)
    assert_transfer_beats_resample(gt, mask, composite, harmonized)


@pytest.mark.parametrize("name", ["house", "cat"])
def test_transfer_on_real_composites(name):
    if not (COMPOSITES / f"{name}_composite.png").is_file():
        pytest.skip(f"real composites not present at {COMPOSITES}")
    gt = image_io.load_image(COMPOSITES / f"{name}_composite.png")
    mask = (image_io.load_mask(COMPOSITES / f"{name}_mask.png") >= 0.5).float()
    composite, harmonized = make_case(gt, mask, global_change, long_side=512, sigma=2.0)
    assert_transfer_beats_resample(gt, mask, composite, harmonized)


def test_square_working_resolution_of_a_wide_composite():
    """DiffHarmony's square mode: the harmonized image is a stretched square; the transfer compares it
    with the composite stretched the same way and still recovers the full-resolution photo."""
    gt = photo("coffee")  # 400x600
    mask = ellipse(400, 600, 200, 300, 150, 220)
    composite, _ = make_case(gt, mask, global_change, 150, 1.0)
    harmonized = images.resize_images(gt, (128, 128))
    out = restore.restore(harmonized, composite, mask, detail="transfer")
    psnr, fmse = full_res_metrics(out, gt, mask)
    assert psnr > 38 and fmse < 20, (psnr, fmse)


@pytest.mark.parametrize("sigma", [0.0, 1.5, 3.0])
def test_blur_estimate_finds_the_harmonized_softness(sigma):
    gt = photo("astronaut")
    mask = ellipse(512, 512, 280, 256, 200, 170)
    composite, harmonized = make_case(gt, mask, global_change, 256, max(sigma, 1e-3))
    size = harmonized.shape[1:3]
    guide = images.resize_nchw(images.to_nchw(composite), size)[0]
    weight = images.resize_masks(mask, size)[0]
    r = ct.default_radius(*size)
    found = ct.estimate_blur(guide.double(), images.to_nchw(harmonized)[0].double(), weight.double(), r,
                             ct.default_step(r))
    assert abs(found - sigma) <= 0.5, found


# ------------------------------------------------------------------------------- exact behaviour
def test_box_mean_matches_a_plain_window_average():
    torch.manual_seed(0)
    x = torch.rand(2, 9, 13, dtype=torch.float64)
    r = 2
    ref = torch.empty_like(x)
    for i in range(9):
        for j in range(13):
            ref[:, i, j] = x[:, max(0, i - r):i + r + 1, max(0, j - r):j + r + 1].mean((1, 2))
    assert torch.allclose(ct.box_mean(x, r), ref, atol=1e-12)


def test_apply_reproduces_spatially_linear_coefficients_exactly():
    """Coefficient maps that are linear in x and y are interpolated exactly by bilinear upsampling, so
    the output must equal A(x,y) g + b(x,y) evaluated analytically at every pixel inside the outer cell
    centres, whatever the strip size."""
    hc, wc, step, fit = 6, 8, 4, (24, 32)
    H, W = 57, 77  # not a multiple of anything: the frame is stretched
    cy = torch.arange(hc, dtype=torch.float64)[:, None].expand(hc, wc)
    cx = torch.arange(wc, dtype=torch.float64)[None, :].expand(hc, wc)
    torch.manual_seed(1)
    base, gy, gx = torch.rand(12, 1, 1, dtype=torch.float64), torch.rand(12, 1, 1) * 0.05, torch.rand(12, 1, 1) * 0.05
    coeffs = base + gy * cy + gx * cx
    grid = ct.AffineGrid(coeffs.float(), fit, step)
    img = torch.rand(H, W, 3) * 0.3
    for strip in (W, 5 * W, 1 << 20):
        out = grid.apply(img, strip_pixels=strip)
        # analytic: pixel centre -> fit pixel -> cell coordinate
        py = (torch.arange(H, dtype=torch.float64) + 0.5) * fit[0] / H - 0.5
        px = (torch.arange(W, dtype=torch.float64) + 0.5) * fit[1] / W - 0.5
        ky = ((py - (step - 1) / 2) / step).clamp(0, hc - 1)
        kx = ((px - (step - 1) / 2) / step).clamp(0, wc - 1)
        c = base + gy * ky[:, None] + gx * kx[None, :]  # [12, H, W]
        a = c[:9].reshape(3, 3, H, W)
        ref = ((a * img.double().permute(2, 0, 1)[None]).sum(1) + c[9:]).permute(1, 2, 0).clamp(0, 1)
        assert torch.allclose(out.double(), ref, atol=2e-6), (out.double() - ref).abs().max()


def test_global_affine_change_is_reproduced_at_full_resolution():
    """When the harmonized image is exactly an affine color change of the composite (no blur), the fit
    recovers it everywhere in the mask at full resolution."""
    gt = photo("astronaut")
    mask = ellipse(512, 512, 280, 256, 200, 170)
    mix = torch.tensor([[0.8, 0.1, 0.05], [0.05, 0.7, 0.1], [0.1, 0.0, 0.6]])
    target_full = gt @ mix.T + torch.tensor([0.05, 0.1, 0.15])
    harmonized = images.resize_images(target_full, (128, 128))
    out = ct.transfer_color(gt, harmonized, mask, blur_sigma=0.0)
    inside = mask[0] > 0.5
    err = (out[0][inside] - target_full[0][inside]).abs()
    assert err.max() < 0.02 and err.mean() < 2e-3, (err.max(), err.mean())


def test_deterministic_inputs_untouched_and_finite_outside_the_mask():
    gt = photo("coffee")
    mask = ellipse(400, 600, 200, 300, 120, 180)
    composite, harmonized = make_case(gt, mask, global_change, 150, 1.5)
    keep = (composite.clone(), harmonized.clone(), mask.clone())
    a = ct.transfer_color(composite, harmonized, mask)
    b = ct.transfer_color(composite, harmonized, mask)
    assert torch.equal(a, b)
    assert torch.equal(composite, keep[0]) and torch.equal(harmonized, keep[1]) and torch.equal(mask, keep[2])
    assert a.shape == composite.shape and a.dtype == torch.float32
    assert torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1


def test_batches_broadcast_and_match_per_item():
    gt = photo("coffee")[:, :200, :300]
    mask = ellipse(200, 300, 100, 150, 70, 100)
    comp_a, harm_a = make_case(gt, mask, global_change, 100, 1.0)
    comp_b, harm_b = make_case(gt, mask, lighting_change, 100, 1.0)
    batch = ct.transfer_color(torch.cat([comp_a, comp_b]), torch.cat([harm_a, harm_b]), mask)  # one mask for 2
    assert torch.equal(batch[:1], ct.transfer_color(comp_a, harm_a, mask))
    assert torch.equal(batch[1:], ct.transfer_color(comp_b, harm_b, mask))


def test_empty_mask_fits_the_whole_frame_and_restore_keeps_the_composite():
    gt = photo("coffee")[:, :120, :160]
    harmonized = images.resize_images(global_change(gt), (60, 80))
    empty = torch.zeros(1, 120, 160)
    out = ct.transfer_color(gt, harmonized, empty)
    assert torch.isfinite(out).all()
    assert torch.equal(restore.restore(harmonized, gt, empty, detail="transfer"), gt)


@pytest.mark.parametrize("full,work", [((10, 10), (1, 1)), ((1, 50), (1, 5)), ((37, 53), (3, 4)),
                                       ((300, 20), (64, 4)), ((64, 64), (2048, 2048))])
def test_any_size_and_working_size(full, work):
    torch.manual_seed(0)
    composite = torch.rand(1, *full, 3)
    harmonized = images.resize_images(global_change(composite), work)
    out = ct.transfer_color(composite, harmonized, torch.ones(1, *full))
    assert out.shape == composite.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("bad", [
    dict(mask=torch.ones(1, 50, 50)),  # aspect differs from the 120x160 composite
    dict(harmonized=torch.rand(1, 30, 40, 2)),  # two channels
    dict(harmonized=torch.rand(3, 30, 40, 3)),  # batch 3 against 2 composites
    dict(radius=0),
    dict(blur_sigma=-1.0),
    dict(fit_long_side=4),
])
def test_bad_input_is_a_clear_error(bad):
    args = dict(composite=torch.rand(2, 120, 160, 3), harmonized=torch.rand(2, 30, 40, 3), mask=torch.ones(1, 120, 160))
    args.update(bad)
    with pytest.raises(InputError):
        ct.transfer_color(**args)


def test_color_transfer_node_is_restore_with_transfer():
    from comfyui_harmonize.nodes.color import NODE_CLASS_MAPPINGS

    node = NODE_CLASS_MAPPINGS["HarmonizeColorTransfer"]
    spec = node.INPUT_TYPES()["required"]
    assert all("tooltip" in opts for _, opts in spec.values()) and node.DESCRIPTION
    gt = photo("coffee")[:, :160, :240]
    mask = ellipse(160, 240, 80, 120, 50, 80)
    composite, harmonized = make_case(gt, mask, global_change, 80, 1.0)
    (out,) = node().run(composite, harmonized, mask, 3)
    assert torch.equal(out, restore.restore(harmonized, composite, mask, 3, detail="transfer"))
