"""Full-resolution, detail-preserving harmonization: transfer the color change, not the pixels.

A diffusion harmonizer works at 512-1024 px through an 8x-compressing VAE, so its foreground comes back
soft: faces, text and fine texture are lost when the result is simply upscaled to the composite's size.
What the harmonizer really decides is *how the colors and the light change*; the edges and texture are
already in the composite. So, like the high-resolution supervised harmonizers (PCT-Net, DCCF,
Harmonizer) that predict a color transformation at low resolution and apply it at full resolution, this
module fits a spatially varying color transformation at the working resolution and applies it to the
full-resolution composite:

1. The composite and the mask are downscaled (antialiased) to the harmonized result's size, exactly as
   the harmonizer saw them (any size and aspect; capped at ``fit_long_side``).
2. **Local affine color models** (the color guided filter of He et al., "Guided Image Filtering", TPAMI
   2013, with mask weights): around every point of a coarse grid (step ``step`` pixels) a 3x3 matrix and an
   offset ``t = A g + b`` map composite colors ``g`` to harmonized colors ``t`` by weighted least squares over
   a square window of radius ``radius`` pixels. The window moments are exact (per-pixel products,
   average-pooled into grid cells, then box sums over cells via integral images), so the cost is O(1) per
   pixel whatever the radius.
3. The coefficient fields are averaged once more over the same window (the guided filter's second step,
   which makes the transformation vary smoothly in space), then
4. upsampled bilinearly to full resolution and applied to the full-resolution composite one strip of rows
   at a time ("Fast Guided Filter", He & Sun 2015). The output is ``A(x) g(x) + b(x)`` with slowly varying
   ``A, b``: every edge and texture of the composite survives, while its colors follow the harmonized result.

**Blur matching.** A diffusion result is softer than the downscaled composite. Fitting a sharp guide to a
soft target biases every local slope towards 0 (the texture the guide has and the target lacks looks like
noise to least squares), which flattens the very detail this module is meant to keep. So the guide is
blurred *for the fit only* with the Gaussian that lets the local models explain the harmonized result
best: a few sigmas are tried (``blur_sigmas``, in pixels at the fit resolution) and the one with the
lowest weighted residual of the local fits wins (``blur_sigma`` fixes it instead). The coefficients are
then applied to the sharp full-resolution composite.

**Regularisation.** Each window's fit is pulled towards one *global* affine model ``(A0, b0)`` fitted on
the whole masked foreground, in two ways: ``prior`` adds virtual samples of the global model (with the
foreground's global color distribution) to every window, so windows with few or no mask pixels fall back
smoothly to the global model instead of being undefined; and a ridge ``eps`` pulls the local matrix towards
``A0`` (the plain guided filter pulls towards 0, which would flatten texture in flat windows; pulling
towards the global color matrix keeps the composite's detail with the global contrast change). Everything
is finite outside the mask too (there the global model applies).

Memory: the fit runs at the (capped) working resolution in float64 one moment channel at a time; the
full-resolution pass allocates the output plus one strip of ``STRIP_PIXELS`` pixels, whatever the input size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import kornia
import torch.nn.functional as F

from ..core import cancel as cancelling
from ..core import images
from ..core.errors import InputError

DEFAULT_EPS = 1e-3  # ridge towards the global color matrix, in (0..1 color units)^2
DEFAULT_PRIOR = 0.02  # weight of the global model's virtual samples, as a fraction of a full window
DEFAULT_FIT_LONG_SIDE = 1024  # the fit runs at the harmonized size, at most this long side
DEFAULT_BLUR_SIGMAS = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)  # candidates, pixels at the fit resolution
STRIP_PIXELS = 1 << 18  # at most this many full-resolution pixels per strip when applying

_UPPER = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))  # unique entries of a symmetric 3x3


def default_radius(height: int, width: int) -> int:
    """Window radius at the fit resolution: 1/64 of the long side (16 px at 1024), at least 2."""
    return max(2, int(round(max(height, width) / 64)))


def default_step(radius: int) -> int:
    """Grid step: a quarter of the radius, so a window spans about 9x9 grid cells."""
    return max(1, int(radius) // 4)


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the ``(2r+1)^2`` window around every pixel of ``x`` ``[C, H, W]``, clipped at the borders
    (each pixel averages the window pixels that exist). Integral images: O(1) per pixel."""
    r = int(radius)

    def along(t: torch.Tensor, dim: int) -> torch.Tensor:
        n = t.shape[dim]
        pad = [r + 1, r, 0, 0] if dim == 2 else [0, 0, r + 1, r]
        cs = torch.cumsum(F.pad(t, pad), dim)
        return cs.narrow(dim, 2 * r + 1, n) - cs.narrow(dim, 0, n)

    def count(n: int) -> torch.Tensor:
        idx = torch.arange(n)
        return ((idx + r + 1).clamp(max=n) - (idx - r).clamp(min=0)).to(x.dtype)

    h, w = x.shape[-2:]
    return along(along(x, 1), 2) / (count(h)[:, None] * count(w)[None, :])


def _sym(v: torch.Tensor) -> torch.Tensor:
    """6 unique entries (order of ``_UPPER``) on dim 0 -> symmetric 3x3 on dims 0, 1."""
    i = ((0, 1, 2), (1, 3, 4), (2, 4, 5))
    return torch.stack([torch.stack([v[i[r][c]] for c in range(3)]) for r in range(3)])


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``[C, H, W]`` (replicated borders: any size, even 1 px); sigma 0 returns ``x``."""
    if sigma <= 0:
        return x

    k = 2 * int(math.ceil(3 * sigma)) + 1
    y = kornia.filters.gaussian_blur2d(x[None].float(), (k, k), (sigma, sigma), border_type="replicate")[0]
    return y.to(x.dtype)


def global_affine(guide: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                  ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least-squares color matrix ``A0`` [3,3] and offset ``b0`` [3] with ``target ~ A0 guide + b0``
    (``guide``/``target`` [3, N], ``weight`` [N]); a small ridge pulls ``A0`` towards the identity, so a flat
    or tiny foreground still gets a well-defined model."""
    wsum = weight.sum()
    mg = (guide * weight).sum(1) / wsum
    mt = (target * weight).sum(1) / wsum
    gc = guide - mg[:, None]
    tc = target - mt[:, None]
    cgg = (gc * weight) @ gc.T / wsum
    ctg = (tc * weight) @ gc.T / wsum
    eye = torch.eye(3, dtype=guide.dtype)
    a0 = torch.linalg.solve(cgg + ridge * eye, (ctg + ridge * eye).T).T
    return a0, mt - a0 @ mg


@dataclass
class AffineGrid:
    """Coefficient maps ``[12, hc, wc]`` (3x3 matrix row-major, then the offset; ``out_i = sum_j A_ij g_j + b_i``)
    on a grid with ``step`` pixels between cell centres over an image of ``size`` (h, w) pixels, the fit
    resolution. ``blur_sigma`` is the guide blur the fit used and ``residual`` its weighted mean squared
    residual (0..1 color units)."""

    coeffs: torch.Tensor
    size: tuple[int, int]
    step: int
    blur_sigma: float = 0.0
    residual: float = float("nan")

    def _taps(self, n_out: int, n_fit: int, n_cells: int, start: int, stop: int):
        """Bilinear taps along one axis for output pixels ``start..stop-1``: the output axis of ``n_out``
        pixels covers the fit axis of ``n_fit`` pixels (pixel centres aligned, as ``F.interpolate`` with
        ``align_corners=False``), on which cell ``k`` is centred at pixel ``k*step + (step-1)/2``; outside the
        first/last centre the border cell is used. Returns (index0, index1, weight of index1)."""
        pos = (torch.arange(start, stop, dtype=torch.float64) + 0.5) * (n_fit / n_out) - 0.5  # fit pixels
        cell = ((pos - (self.step - 1) / 2) / self.step).clamp(0, n_cells - 1)
        i0 = cell.floor().long().clamp(max=n_cells - 1)
        i1 = (i0 + 1).clamp(max=n_cells - 1)
        return i0, i1, (cell - i0).float()

    def apply(self, image: torch.Tensor, out: torch.Tensor | None = None,
              strip_pixels: int = STRIP_PIXELS, cancel: cancelling.Cancel = None) -> torch.Tensor:
        """Apply to one image ``[H, W, 3]`` of any size covering the same frame (the coefficient maps are
        stretched over it and interpolated bilinearly); writes into ``out`` ([H,W,3] float32, contiguous)
        when given. The result is clamped to 0..1.

        Rows are processed in strips of at most ``strip_pixels`` pixels that never straddle two grid rows,
        so the vertical interpolation is one fused ``base + fy * (next - base)`` per strip. ``cancel`` is
        checked before every strip."""
        hh, ww = image.shape[:2]
        if out is None:
            out = torch.empty(hh, ww, 3, dtype=torch.float32)
        coeffs = self.coeffs.float()
        hc, wc = coeffs.shape[-2:]
        x0, x1, fx = self._taps(ww, self.size[1], wc, 0, ww)
        r0, r1, fy = self._taps(hh, self.size[0], hc, 0, hh)
        cache: dict[int, torch.Tensor] = {}

        def grid_row(k: int) -> torch.Tensor:  # grid row k interpolated along x to the output width: [12, W]
            if k not in cache:
                if len(cache) > 2:
                    cache.pop(min(cache))
                cache[k] = torch.lerp(coeffs[:, k, x0], coeffs[:, k, x1], fx)
            return cache[k]

        max_rows = max(1, int(strip_pixels) // ww)
        y0 = 0
        while y0 < hh:
            cancelling.check(cancel)
            k = int(r0[y0])
            y1 = y0 + 1
            while y1 < hh and y1 - y0 < max_rows and int(r0[y1]) == k:
                y1 += 1
            base = grid_row(k)[:, None, :]
            nxt = grid_row(int(r1[y0]))[:, None, :]
            c = torch.addcmul(base.expand(-1, y1 - y0, -1), nxt - base, fy[y0:y1, None])  # [12, rows, W]
            g = image[y0:y1].float().permute(2, 0, 1).contiguous()
            chans = []
            for i in range(3):
                v = c[9 + i]
                for j in range(3):
                    v = v.addcmul_(c[3 * i + j], g[j])
                chans.append(v.clamp_(0, 1))
            torch.stack(chans, -1, out=out[y0:y1])
            y0 = y1
        return out


def _fit(guide: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, radius: int, step: int,
         eps: float, prior: float, cancel: cancelling.Cancel = None) -> AffineGrid:
    """Local affine fit for one guide (already blurred as wanted); inputs float64 ``[3,h,w]``/``[h,w]``."""
    h, w = weight.shape
    wflat = weight.reshape(-1)
    a0, b0 = global_affine(guide.reshape(3, -1), target.reshape(3, -1), wflat)
    # centre on the foreground means: the window moments are then small numbers (no cancellation)
    mg = (guide.reshape(3, -1) * wflat).sum(1) / wflat.sum()
    mt = a0 @ mg + b0  # = the foreground mean of the target
    g = guide - mg[:, None, None]
    t = target - mt[:, None, None]
    cgg0 = (g.reshape(3, -1) * wflat) @ g.reshape(3, -1).T / wflat.sum()

    rc = max(1, int(round(radius / step)))  # window radius in cells

    def moment(x: torch.Tensor) -> torch.Tensor:  # [h,w] per-pixel product -> window mean on the grid
        cancelling.check(cancel)  # 22 moments: a cancel point every few hundred ms at the fit size
        pooled = F.avg_pool2d(x[None, None], step, step, ceil_mode=True)[0] if step > 1 else x[None]
        return box_mean(pooled, rc)[0]

    wg = weight * g
    wt = weight * t
    s0 = moment(weight) + prior
    s_g = torch.stack([moment(wg[i]) for i in range(3)])
    s_t = torch.stack([moment(wt[i]) for i in range(3)])
    s_gg = torch.stack([moment(wg[i] * g[j]) for i, j in _UPPER])
    s_tg = torch.stack([moment(wt[i] * g[j]) for i in range(3) for j in range(3)])
    s_tt = torch.stack([moment(wt[i] * t[i]) for i in range(3)])  # diagonal only: for the residual
    del wg, wt
    # the global model's virtual samples (centred: mean 0, covariance cgg0, t = A0 g)
    s_gg = s_gg + prior * torch.stack([cgg0[i, j] for i, j in _UPPER])[:, None, None]
    cvt = a0 @ cgg0
    s_tg = s_tg + prior * cvt.reshape(9)[:, None, None]
    s_tt = s_tt + prior * torch.diagonal(cvt @ a0.T)[:, None, None]

    hc, wc = s0.shape
    m_g = s_g / s0
    m_t = s_t / s0
    cov_gg = _sym(s_gg / s0) - m_g[:, None] * m_g[None, :]  # [3,3,hc,wc]
    cov_tg = (s_tg / s0).reshape(3, 3, hc, wc) - m_t[:, None] * m_g[None, :]
    var_t = s_tt / s0 - m_t * m_t
    lam = eps / s0
    eye = torch.eye(3, dtype=g.dtype)
    lhs = (cov_gg + lam * eye[:, :, None, None]).permute(2, 3, 0, 1)  # [hc,wc,3,3], SPD
    rhs = (cov_tg + lam * a0[:, :, None, None]).permute(2, 3, 0, 1)
    # A = rhs lhs^-1  <=>  A^T = lhs^-1 rhs^T
    a = torch.linalg.solve(lhs, rhs.transpose(-1, -2)).transpose(-1, -2).permute(2, 3, 0, 1)  # [3,3,hc,wc]
    # residual of each window's fit: var_t - 2 tr(A cov_gt) + tr(A cov_gg A^T), diagonal terms summed
    cov_ag = (a[:, :, None] * cov_gg[None]).sum(1)  # (A cov_gg)[i,k]
    res = var_t.sum(0) - 2 * (a * cov_tg).sum((0, 1)) + (cov_ag * a).sum((0, 1))
    data = s0 - prior
    residual = float((res.clamp(min=0) * data).sum() / data.sum().clamp(min=1e-12))
    b = m_t - (a * m_g[None]).sum(1) + mt[:, None, None] - (a * mg[None, :, None, None]).sum(1)  # un-centred
    coeffs = torch.cat([a.reshape(9, hc, wc), b], 0)
    # second guided-filter averaging, weighted by each window's confidence s0
    coeffs = box_mean(coeffs * s0, rc) / box_mean(s0[None], rc)
    return AffineGrid(coeffs.float(), (h, w), step, 0.0, residual)


LUMA = (0.299, 0.587, 0.114)  # Rec. 601 weights: the blur search compares luminance only


def estimate_blur(guide: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, radius: int, step: int,
                  sigmas=DEFAULT_BLUR_SIGMAS, eps: float = DEFAULT_EPS, prior: float = DEFAULT_PRIOR,
                  cancel: cancelling.Cancel = None) -> float:
    """The Gaussian sigma (pixels) from ``sigmas`` that, applied to the guide, lets local affine models
    explain the target best: for each candidate, a ridge-regularised 1-D local fit of the target's luminance
    on the blurred guide's luminance over the same windows as the color fit, scored by the mask-weighted
    mean residual. Luminance only (5 moment channels instead of 22): blur affects all channels alike."""
    luma = torch.tensor(LUMA, dtype=guide.dtype)
    gl = (guide * luma[:, None, None]).sum(0)
    tl = (target * luma[:, None, None]).sum(0)
    wsum = weight.sum()
    mg = (gl * weight).sum() / wsum
    mt = (tl * weight).sum() / wsum
    tl = tl - mt
    rc = max(1, int(round(radius / step)))

    def moment(x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x[None, None], step, step, ceil_mode=True)[0] if step > 1 else x[None]
        return box_mean(pooled, rc)[0]

    s0 = moment(weight) + prior
    data = s0 - prior
    wt = weight * tl
    m_t = moment(wt) / s0
    var_t = moment(wt * tl) / s0 - m_t * m_t
    best, best_res = None, None
    for sigma in sigmas:
        cancelling.check(cancel)
        g = gaussian_blur(gl[None], float(sigma))[0] - mg
        wg = weight * g
        m_g = moment(wg) / s0
        var_g = moment(wg * g) / s0 - m_g * m_g
        cov = moment(wg * tl) / s0 - m_g * m_t
        a = cov / (var_g + eps / s0)
        res = (var_t - 2 * a * cov + a * a * var_g).clamp(min=0)
        score = float((res * data).sum() / data.sum().clamp(min=1e-12))
        if best_res is None or score < best_res:
            best, best_res = float(sigma), score
    return best


def fit_local_affine(guide: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                     radius: int | None = None, eps: float = DEFAULT_EPS, prior: float = DEFAULT_PRIOR,
                     blur_sigma: float | None = None, blur_sigmas=DEFAULT_BLUR_SIGMAS,
                     step: int | None = None, cancel: cancelling.Cancel = None) -> AffineGrid:
    """Fit ``target ~ A(x) blur(guide) + b(x)`` inside ``weight`` (see the module docstring).

    ``guide``, ``target``: ``[3, h, w]`` 0..1 at the same size; ``weight``: ``[h, w]`` in 0..1 (an all-zero
    weight fits the whole image). ``blur_sigma`` None estimates it from ``blur_sigmas`` (``estimate_blur``).
    ``cancel`` is checked per candidate blur and per window moment of the fit.
    """
    if eps <= 0 or prior <= 0:
        raise InputError(f"eps and prior must be > 0, got eps={eps}, prior={prior}")
    if guide.shape != target.shape or guide.shape[0] != 3 or tuple(weight.shape) != tuple(guide.shape[1:]):
        raise InputError(f"guide and target must be [3,h,w] and weight [h,w] of the same size, got "
                         f"{tuple(guide.shape)}, {tuple(target.shape)}, {tuple(weight.shape)}")
    h, w = weight.shape
    r = default_radius(h, w) if radius is None else int(radius)
    if r < 1:
        raise InputError(f"radius must be >= 1 (pixels at the fit resolution), got {radius}")
    s = default_step(r) if step is None else max(1, int(step))
    g = guide.double()
    t = target.double()
    wt = weight.double().clamp(0, 1)
    if float(wt.sum()) < 1e-6:
        wt = torch.ones_like(wt)
    if blur_sigma is None:
        sigmas = [float(x) for x in blur_sigmas]
        if not sigmas or min(sigmas) < 0:
            raise InputError(f"blur sigmas must be >= 0, got {sigmas}")
        blur_sigma = estimate_blur(g, t, wt, r, s, sigmas, eps, prior, cancel)
    elif blur_sigma < 0:
        raise InputError(f"blur_sigma must be >= 0 (pixels at the fit resolution), got {blur_sigma}")
    grid = _fit(gaussian_blur(g, float(blur_sigma)), t, wt, r, s, eps, prior, cancel)
    grid.blur_sigma = float(blur_sigma)
    return grid


def fit_size_for(harmonized_hw: tuple[int, int], fit_long_side: int) -> tuple[int, int]:
    """The harmonized size, scaled down (aspect kept) when its long side exceeds ``fit_long_side``."""
    h, w = harmonized_hw
    if max(h, w) <= fit_long_side:
        return h, w
    s = fit_long_side / max(h, w)
    return max(1, int(round(h * s))), max(1, int(round(w * s)))


def transfer_color(composite: torch.Tensor, harmonized: torch.Tensor, mask: torch.Tensor,
                   radius: int | None = None, eps: float = DEFAULT_EPS, prior: float = DEFAULT_PRIOR,
                   blur_sigma: float | None = None, fit_long_side: int = DEFAULT_FIT_LONG_SIDE,
                   callback=None, cancel: cancelling.Cancel = None) -> torch.Tensor:
    """Apply the color change from ``composite`` to ``harmonized`` to the full-resolution ``composite``.

    ``composite`` IMAGE ``[B,H,W,3]`` (full resolution), ``harmonized`` IMAGE ``[B,h,w,3]`` at the working
    resolution (any size and aspect: it is compared with the composite resized to exactly its size, as the
    harmonizer saw it), ``mask`` MASK ``[B,H,W]`` (or the same aspect). Returns IMAGE ``[B,H,W,3]`` whose
    colors and light follow ``harmonized`` inside the mask while edges and texture are the composite's own;
    outside the mask it holds the global color model's output (finite; meant to be replaced by the
    background when pasting, as ``restore.restore`` does).

    ``radius``: window radius in pixels at the fit resolution (default long side / 64); ``eps``/``prior``:
    regularisation; ``blur_sigma``: the harmonized result's softness in fit pixels (None: estimated);
    ``fit_long_side``: the fit runs at the harmonized size, scaled down to at most this long side.
    Deterministic; never modifies its inputs. ``callback(step, total)`` is called once per image;
    ``cancel`` is checked per candidate blur, per window moment of each fit and before every strip of the full-resolution
    pass (``STRIP_PIXELS`` pixels).
    """
    composite, harmonized, mask = images.composite_result_mask(composite, harmonized, mask)
    if int(fit_long_side) < 8:
        raise InputError(f"fit_long_side must be >= 8, got {fit_long_side}")
    return transfer_unchecked(composite, harmonized, mask, radius, eps, prior, blur_sigma, fit_long_side, callback,
                              cancel)


def transfer_unchecked(composite: torch.Tensor, harmonized: torch.Tensor, mask: torch.Tensor,
                       radius: int | None = None, eps: float = DEFAULT_EPS, prior: float = DEFAULT_PRIOR,
                       blur_sigma: float | None = None, fit_long_side: int = DEFAULT_FIT_LONG_SIDE,
                       callback=None, cancel: cancelling.Cancel = None) -> torch.Tensor:
    """:func:`transfer_color` on inputs already checked (``images.composite_result_mask``)."""
    bsz, hh, ww = composite.shape[:3]
    size = fit_size_for(tuple(harmonized.shape[1:3]), int(fit_long_side))
    out = torch.empty(bsz, hh, ww, 3, dtype=torch.float32)
    for i in range(bsz):
        cancelling.check(cancel)
        guide = images.resize_nchw(images.to_nchw(composite[i:i + 1]), size)[0].clamp(0, 1)
        target = images.resize_nchw(images.to_nchw(harmonized[i:i + 1]), size)[0].clamp(0, 1)
        weight = images.resize_nchw(mask[i:i + 1, None], size)[0, 0].clamp(0, 1)
        grid = fit_local_affine(guide, target, weight, radius, eps, prior, blur_sigma, cancel=cancel)
        grid.apply(composite[i], out[i], cancel=cancel)
        if callback is not None:
            callback(i + 1, bsz)
    return out
