"""ComfyUI image/mask conventions, validation, resizing and pasting.

IMAGE is ``[B, H, W, C]`` float in 0..1, MASK is ``[B, H, W]`` (or ``[H, W]``) in 0..1. Functions here
never modify their inputs.

Integer tensors (one rule for every node and entry point): ``uint8`` is read as 0..255 and divided by 255
with a warning (a node that hands over 8-bit pixels is common and unambiguous); ``bool`` is 0/1; any other
integer type is refused, since its range cannot be known.

Checked once. A public entry point (a node's pipeline call, a stage function, the all-in-one ``harmonize``)
validates its IMAGE/MASK inputs with these functions before any work (types, shapes, finite values, sizes,
batches); the stages it then runs take the validated tensors as they are (their ``*_unchecked`` variants),
so a composite is checked once per run however many stages see it.

Empty masks, one policy. A mask "selects no pixel" when none of its values is >= 0.5.
- Stages that change an image (DiffHarmony, restore, colour transfer, colour match): that image comes back
  unchanged, with one warning naming its index in the batch; the other images are processed.
- Stages that need the object to do anything (zero-shot harmonization, describing the object to a VLM,
  fitting a LUT): an ``InputError`` before any work (:func:`require_foreground`).
- Measures: defined values, never an error (fMSE of an empty mask is NaN and left out of averages, the
  Lab statistics score is 1, the edge loss is 0).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from . import cancel as cancelling
from .errors import InputError

ASPECT_TOLERANCE = 0.02
PASTE_ROWS = 512  # relative difference of aspect ratios up to which a mask is simply resized


def as_float(x: torch.Tensor, name: str, kind: str) -> torch.Tensor:
    """``x`` as float32 in the 0..1 convention (see the module docstring for integer tensors)."""
    if x.is_floating_point():
        return x.float()
    if x.dtype == torch.bool:
        return x.float()
    if x.dtype == torch.uint8:
        warnings.warn(f"{name}: a uint8 {kind} (0..255) was given where ComfyUI's {kind} is float 0..1; it is "
                      f"divided by 255")
        return x.float() / 255.0
    raise InputError(f"{name} is a {x.dtype} tensor; expected a float {kind} in 0..1 (or uint8 0..255)")


def image_batch(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """Return ``[B, H, W, 3]`` float32 from an IMAGE-like tensor (HWC or BHWC; 1, 3 or 4 channels)."""
    if not isinstance(image, torch.Tensor):
        raise InputError(f"{name} must be a torch tensor [B,H,W,C], got {type(image).__name__}")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4:
        raise InputError(f"{name} must have shape [B,H,W,C] (ComfyUI IMAGE), got {tuple(image.shape)}")
    b, h, w, c = image.shape
    if b == 0 or h == 0 or w == 0:
        raise InputError(f"{name} is empty: shape {tuple(image.shape)}")
    if c == 1:
        image = image.expand(b, h, w, 3)
    elif c == 4:
        image = image[..., :3]
    elif c != 3:
        raise InputError(f"{name} must have 1 (grey), 3 (RGB) or 4 (RGBA) channels, got {c} in shape {tuple(image.shape)}")
    image = as_float(image, name, "IMAGE")
    if not torch.isfinite(image).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return image


def mask_batch(mask: torch.Tensor, height: int, width: int, name: str = "mask") -> torch.Tensor:
    """Return ``[B, height, width]`` float32 in 0..1. A mask of another size but the same aspect ratio is
    resized (bilinear); a different aspect ratio is an error."""
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"{name} must be a torch tensor [B,H,W], got {type(mask).__name__}")
    if mask.dim() == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() != 3:
        raise InputError(f"{name} must have shape [B,H,W] or [H,W] (ComfyUI MASK), got {tuple(mask.shape)}")
    mask = as_float(mask, name, "MASK").clamp(0, 1)
    mh, mw = mask.shape[-2:]
    if (mh, mw) != (height, width):
        if mh == 0 or mw == 0:
            raise InputError(f"{name} is empty: shape {tuple(mask.shape)}")
        if not bool((mask > 0).any()):  # e.g. LoadImage's 64x64 zeros for an image without alpha
            return torch.zeros(mask.shape[0], height, width)
        ratio = (mw / mh) / (width / height)
        if abs(ratio - 1.0) > ASPECT_TOLERANCE:
            raise InputError(
                f"{name} is {mw}x{mh} (WxH) but the image is {width}x{height}: the aspect ratios differ, so the "
                f"mask cannot be resized to fit. Expected a mask of the image's size (or the same aspect ratio)."
            )
        mask = F.interpolate(mask[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    return mask


def match_batches(images: torch.Tensor, masks: torch.Tensor,
                  names: tuple[str, str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast a batch of 1 against the other; different batch sizes > 1 are an error. ``names``
    (e.g. ``("composite", "harmonized")``) names the two inputs in that error; the default is an IMAGE
    batch and its MASK batch."""
    bi, bm = images.shape[0], masks.shape[0]
    if bi == bm:
        return images, masks
    if bm == 1:
        return images, masks.expand(bi, *masks.shape[1:])
    if bi == 1:
        return images.expand(bm, *images.shape[1:]), masks
    if names is None:
        raise InputError(
            f"batch mismatch: {bi} images but {bm} masks. Expected one mask for all images, "
            f"one mask per image, or one image with several masks."
        )
    raise InputError(
        f"batch mismatch: {names[0]} holds {bi} images but {names[1]} holds {bm}. Expected the same batch "
        f"size for both, or a batch of 1 in one of them (used for every image of the other)."
    )


def image_and_mask(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate an IMAGE + MASK pair and return them as matching ``[B,H,W,3]`` / ``[B,H,W]`` batches."""
    image = image_batch(image)
    mask = mask_batch(mask, image.shape[1], image.shape[2])
    return match_batches(image, mask)


def composite_result_mask(composite: torch.Tensor, result: torch.Tensor, mask: torch.Tensor,
                          result_name: str = "harmonized") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate a composite IMAGE, a result IMAGE made from it (any size) and the MASK: matching batches
    (a batch of 1 is used for every image of the other), the mask at the composite's size."""
    composite, mask = image_and_mask(composite, mask)
    result = image_batch(result, result_name)
    composite, result = match_batches(composite, result, ("composite", result_name))
    mask = match_batches(composite, mask)[1]
    return composite, result, mask


def empty_masks(mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Bool ``[B]``: which masks select no pixel at ``threshold``."""
    return ~(mask >= threshold).flatten(1).any(dim=1)


def warn_empty(mask: torch.Tensor, what: str) -> torch.Tensor:
    """Warn when some masks are empty; return the bool ``[B]`` of empty masks."""
    empty = empty_masks(mask)
    if bool(empty.any()):
        idx = empty.nonzero().flatten().tolist()
        warnings.warn(f"{what}: mask {idx} selects no pixel (>= 0.5); that composite is returned unchanged")
    return empty


def require_foreground(mask: torch.Tensor, what: str) -> None:
    """The empty-mask policy of stages that need the object: an InputError naming the empty masks."""
    empty = empty_masks(mask)
    if bool(empty.any()):
        idx = empty.nonzero().flatten().tolist()
        raise InputError(f"{what}: mask {idx} selects no pixel (>= 0.5); expected the pasted object in white on "
                         f"black")


def fit_size(height: int, width: int, long_side: int, multiple: int = 8, square: bool = False) -> tuple[int, int]:
    """Working size: the long side becomes ``long_side`` keeping the aspect ratio, both sides rounded to a
    multiple of ``multiple`` (at least one multiple). ``square`` gives ``long_side x long_side``, as the
    official DiffHarmony code does."""
    if long_side < multiple or long_side % multiple:
        raise InputError(f"resolution must be a positive multiple of {multiple}, got {long_side}")
    if square:
        return long_side, long_side
    scale = long_side / max(height, width)
    h = max(multiple, int(round(height * scale / multiple)) * multiple)
    w = max(multiple, int(round(width * scale / multiple)) * multiple)
    return h, w


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def to_nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def resize_nchw(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize ``[B,C,H,W]``; bilinear is antialiased (as PIL / the official preprocessing)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize an IMAGE batch ``[B,H,W,C]`` to ``size`` (H, W)."""
    if tuple(images.shape[1:3]) == tuple(size):
        return images.clamp(0, 1)
    return to_nhwc(resize_nchw(to_nchw(images), size)).clamp_(0, 1)  # clamp the fresh result in place


def resize_masks(masks: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    return resize_nchw(masks[:, None], size, mode)[:, 0].clamp(0, 1)


def to_signed(images_bhwc: torch.Tensor) -> torch.Tensor:
    """IMAGE ``[B,H,W,C]`` 0..1 -> ``[B,C,H,W]`` in -1..1."""
    return to_nchw(images_bhwc) * 2.0 - 1.0


def from_signed(x_nchw: torch.Tensor) -> torch.Tensor:
    """``[B,C,H,W]`` in -1..1 -> IMAGE ``[B,H,W,C]`` 0..1 (clamped), float32 on the CPU."""
    return to_nhwc((x_nchw.float() / 2 + 0.5).clamp(0, 1)).cpu().contiguous()


def feather_mask(mask: torch.Tensor, radius: int, cancel: cancelling.Cancel = None) -> torch.Tensor:
    """Soften the mask edge *inwards* over ``radius`` pixels: the result is never larger than the mask,
    so pixels outside the mask stay untouched when pasting.

    Each pixel is weighted by ``smoothstep((d - 0.5) / radius)``, ``d`` its Euclidean distance to the nearest
    pixel outside the mask (< 0.5); the image border is not an edge. One exact distance transform per
    image (scipy), so the cost does not depend on the radius. A radius wider than an object (its deepest
    pixel is less than ``radius + 0.5`` px from the edge) would leave nothing at full strength and fade the
    whole object out: it is clamped to that depth for that image, with a warning. ``cancel`` is checked
    once per image."""
    radius = int(radius)
    if radius <= 0:
        return mask
    from scipy import ndimage

    out = mask.clone()
    clamped = []
    for i in range(mask.shape[0]):
        cancelling.check(cancel)
        inside = (mask[i] >= 0.5).numpy()
        if inside.all() or not inside.any():
            continue  # no edge to soften, or nothing to paste
        depth = torch.from_numpy(ndimage.distance_transform_edt(inside)).float()
        deepest = float(depth.max())
        r = float(radius)
        if radius + 0.5 > deepest:
            r = max(deepest - 0.5, 0.5)
            clamped.append((i, deepest))
        t = ((depth - 0.5) / r).clamp_(0, 1)
        out[i] = torch.minimum(t * t * (3 - 2 * t), mask[i])
    if clamped:
        where = ", ".join(f"image {i}: {d - 0.5:g} px" for i, d in clamped)
        warnings.warn(f"feather {radius} px is wider than the object, which would fade it out entirely; "
                      f"clamped to the object's depth ({where})")
    return out


def paste(harmonized: torch.Tensor, composite: torch.Tensor, mask: torch.Tensor, feather: int = 0,
          cancel: cancelling.Cancel = None) -> torch.Tensor:
    """Blend ``harmonized`` (any size, resized to the composite's) into ``composite`` inside ``mask``.

    Pixels where the mask is 0 are copied from the composite bit for bit. Images ``[B,H,W,3]``, mask
    ``[B,H,W]`` at the composite's size. ``cancel`` is checked per image (feather) and per strip.
    """
    h, w = composite.shape[1:3]
    out = resize_images(harmonized, (h, w)).contiguous()
    m = feather_mask(mask, feather, cancel)[..., None]
    for r in range(0, h, PASTE_ROWS):  # row strips: temporaries stay small on 20-megapixel images
        cancelling.check(cancel)
        o, c, mm = out[:, r:r + PASTE_ROWS], composite[:, r:r + PASTE_ROWS], m[:, r:r + PASTE_ROWS]
        o.copy_(torch.where(mm > 0, o * mm + c * (1 - mm), c))
    return out
