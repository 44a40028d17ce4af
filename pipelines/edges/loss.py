"""Edge constraint of zero-shot harmonization (paper Eq. 5-6).

    L_edge = ||E_S(I) - E_S(I')||^2 + gamma * ||E_D(I) - E_D(I')||^2,   inside the foreground mask,

with E_S the Sobel edge map, E_D the PiDiNet edge map, I the ORIGINAL composite and I' the image decoded
at the current diffusion step.

Conventions (both images of a comparison are always on the same range, unlike the official code, which
takes Sobel of the reference on [-1, 1] and of the generated image on [0, 1]):

- Images are RGB ``[B,3,H,W]`` in **[0, 1]** (convert VAE output with ``(x / 2 + 0.5).clamp(0, 1)``).
  Any floating dtype; the edge maps and the loss are computed in float32 (float64 stays float64).
- ``E_S``: per-channel Sobel gradient magnitude ``sqrt(gx^2 + gy^2 + 1e-6)`` with kornia's normalised 3x3
  Sobel kernels (divided by 8) and replicated borders, as ``kornia.filters.Sobel()`` (the official code's
  choice). On [0, 1] images the magnitude lies in [0.001, 0.71]. It is homogeneous in the image's scale,
  which is why both images must share one value range.
- ``E_D``: PiDiNet's fused edge probability ``[B,1,H,W]``, input normalised with the ImageNet mean/std inside
  the model. Its gradient reaches the image (the official code wraps PiDiNet in no-grad, so its term never
  contributes a gradient).
- Mask normalisation: each squared difference map is averaged over its channels and then over the
  foreground with the mask as weights, ``sum(m * d^2) / sum(m)``, per image; the batch mean of that is the
  term. For a binary mask this is the mean squared difference over the mask's pixels; the official code's
  ``MSELoss(E * m, E' * m)`` equals it times the fraction of the image the mask covers. An empty mask gives 0.
"""
from __future__ import annotations

from typing import NamedTuple

import kornia
import torch

from ..core import images
from ..core.errors import InputError

SOBEL_EPS = 1e-6
DEFAULT_GAMMA = 0.1  # PiDiNet weight (paper appendix C)
# Values outside this interval mean the image is not on [0, 1] (e.g. still on [-1, 1], or 0..255).
RANGE_SLACK = 0.5


class EdgeMaps(NamedTuple):
    """Edge maps of a reference image: Sobel ``[B,3,H,W]`` and, when a PiDiNet was given, ``[B,1,H,W]``."""

    sobel: torch.Tensor
    pidinet: torch.Tensor | None = None

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.sobel.shape[-2:])


def _check_image(img: torch.Tensor, name: str) -> None:
    if not isinstance(img, torch.Tensor):
        raise InputError(f"{name} must be a torch tensor [B,3,H,W], got {type(img).__name__}")
    if img.dim() != 4 or img.shape[1] != 3 or img.shape[0] == 0 or min(img.shape[-2:]) < 1:
        raise InputError(f"{name} must be RGB [B,3,H,W] (channels first) in [0,1], got shape {tuple(img.shape)}")
    if not img.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor in [0,1], got {img.dtype}")


def _check_range(img: torch.Tensor, name: str) -> None:
    lo, hi = torch.aminmax(img.detach())
    lo, hi = float(lo), float(hi)
    if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
        raise InputError(
            f"{name} has values in [{lo:.3g}, {hi:.3g}], expected RGB in [0,1]. Convert VAE output (on [-1,1]) "
            f"with (x / 2 + 0.5).clamp(0, 1) and 8-bit images by dividing by 255."
        )


def _work(x: torch.Tensor) -> torch.Tensor:
    """float32 for the edge maps and the loss (float64 kept, for exact checks)."""
    return x if x.dtype == torch.float64 else x.float()


def sobel_edges(img: torch.Tensor) -> torch.Tensor:
    """Per-channel Sobel gradient magnitude of RGB ``[B,3,H,W]`` in [0,1] -> ``[B,3,H,W]`` float32."""

    _check_image(img, "image")
    return kornia.filters.sobel(_work(img), normalized=True, eps=SOBEL_EPS)


def pidinet_edges(model: torch.nn.Module, img: torch.Tensor) -> torch.Tensor:
    """PiDiNet's fused edge probability of RGB ``[B,3,H,W]`` in [0,1] -> ``[B,1,H,W]`` float32 (the input
    is cast to the model's dtype; it must already be on the model's device). Differentiable in ``img``."""
    _check_image(img, "image")
    param = next(model.parameters())
    if img.device != param.device:
        raise InputError(f"image is on {img.device} but the PiDiNet model is on {param.device}; move one of them")
    return _work(model(img.to(param.dtype)))


def reference_edges(reference: torch.Tensor, pidinet: torch.nn.Module | None = None) -> EdgeMaps:
    """Edge maps of the reference image (the ORIGINAL composite at the working size), without gradients.
    Compute them once and pass the result to :func:`edge_loss` at every step."""
    _check_image(reference, "reference")
    _check_range(reference, "reference")
    with torch.no_grad():
        sobel = sobel_edges(reference)
        pidi = pidinet_edges(pidinet, reference) if pidinet is not None else None
    return EdgeMaps(sobel, pidi)


def _mask_weights(mask: torch.Tensor, batch: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """``[B,1,H,W]`` float32 mask weights from a MASK-like tensor ([B,H,W], [H,W] or [B,1,H,W])."""
    m = images.mask_batch(mask, height, width)
    if m.shape[0] not in (1, batch):
        raise InputError(f"batch mismatch: {batch} images but {m.shape[0]} masks; expected 1 or {batch} masks")
    return m.to(device).expand(batch, height, width)[:, None]


def _masked_mean(diff_sq: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    per_pixel = diff_sq.mean(dim=1, keepdim=True)  # average over channels
    num = (per_pixel * weights).flatten(1).sum(1)
    den = weights.flatten(1).sum(1)
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num)).mean()


def _broadcast(ref: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if ref.shape[0] == batch:
        return ref
    if ref.shape[0] == 1:
        return ref.expand(batch, *ref.shape[1:])
    raise InputError(f"batch mismatch: {batch} images but {ref.shape[0]} {what}; expected 1 or {batch}")


def edge_terms(image: torch.Tensor, reference: torch.Tensor | EdgeMaps, mask: torch.Tensor,
               pidinet: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of Eq. 5 separately: ``(sobel_term, pidinet_term)``, scalar float32 tensors
    (``pidinet_term`` is 0 without a PiDiNet). Arguments as in :func:`edge_loss`."""
    _check_image(image, "image")
    _check_range(image, "image")
    b, _, h, w = image.shape
    ref = reference if isinstance(reference, EdgeMaps) else reference_edges(reference, pidinet)
    if ref.size != (h, w):
        raise InputError(
            f"reference edges are {ref.size[1]}x{ref.size[0]} (WxH) but the image is {w}x{h}; compute the "
            f"reference at the working size of the image"
        )
    if pidinet is not None and ref.pidinet is None:
        raise InputError("a PiDiNet was given but the reference edges were computed without one; "
                         "call reference_edges(reference, pidinet) with the same model")
    weights = _mask_weights(mask, b, h, w, image.device)
    ref_sobel = _broadcast(ref.sobel, b, "reference images").to(image.device)
    sobel_term = _masked_mean((sobel_edges(image) - ref_sobel) ** 2, weights)
    if pidinet is None:
        return sobel_term, torch.zeros((), device=image.device)
    ref_pidi = _broadcast(ref.pidinet, b, "reference images").to(image.device)
    pidi_term = _masked_mean((pidinet_edges(pidinet, image) - ref_pidi) ** 2, weights)
    return sobel_term, pidi_term


def edge_loss(image: torch.Tensor, reference: torch.Tensor | EdgeMaps, mask: torch.Tensor,
              pidinet: torch.nn.Module | None = None, gamma: float = DEFAULT_GAMMA) -> torch.Tensor:
    """Eq. 5: ``sobel_term + gamma * pidinet_term`` inside ``mask`` (scalar float32 tensor).

    ``image``: the current decoded image, RGB ``[B,3,H,W]`` in [0,1], differentiable.
    ``reference``: the original composite at the same size (``[1 or B,3,H,W]`` in [0,1]) or, better, its
    :func:`reference_edges` computed once. ``mask``: foreground ``[B,H,W]``, ``[H,W]`` or ``[B,1,H,W]`` in
    [0,1] (same size as the image, or the same aspect ratio: it is resized). ``pidinet``: a loaded PiDiNet,
    or None for the Sobel term only; ``gamma`` 0 skips PiDiNet entirely.
    """
    if gamma == 0:
        pidinet = None
    sobel_term, pidi_term = edge_terms(image, reference, mask, pidinet)
    return sobel_term + gamma * pidi_term if pidinet is not None else sobel_term


def edge_preview(image: torch.Tensor, pidinet: torch.nn.Module | None = None, long_side: int = 512,
                 normalize: bool = False, device: torch.device | str | None = None, callback=None) -> torch.Tensor:
    """The edge maps the constraint compares, as an IMAGE ``[B,h,w,3]``: Sobel (per-channel magnitude, shown
    as RGB) without ``pidinet``, PiDiNet's edge probability (grey) with it. Computed at the working size
    (long side ``long_side``, multiple of 8; 0 keeps the input size), where the constraint sees the image.
    ``normalize`` scales each map to a maximum of 1 for viewing. ``callback(step, total)`` per image."""
    imgs = images.image_batch(image)
    b, h, w, _ = imgs.shape
    if long_side:
        h, w = images.fit_size(h, w, long_side)
    if device is None:
        device = next(pidinet.parameters()).device if pidinet is not None else torch.device("cpu")
    out = []
    for i in range(b):
        x = images.resize_nchw(images.to_nchw(imgs[i:i + 1]), (h, w)).clamp(0, 1).to(device)
        with torch.no_grad():
            e = pidinet_edges(pidinet, x).expand(1, 3, h, w) if pidinet is not None else sobel_edges(x)
        if normalize:
            e = e / e.amax().clamp_min(1e-6)
        out.append(images.to_nhwc(e.clamp(0, 1)).cpu())
        if callback is not None:
            callback(i + 1, b)
    return torch.cat(out).contiguous()
