"""DiffHarmony fed exactly what the authors' data loader feeds it (``--preprocess official``).

The authors' test loader (src/dataset/ihd_dataset.py, reference/diffharmony.md "The authors' data loader")
works on PIL images, and its inference script (scripts/inference/main.py) on what it returns:

- composite: ``Image.open(...).convert("RGB")``, resized with PIL bilinear (antialiased, on 8-bit values) to
  ``res x res`` unless it already has that size, then ``ToTensor`` and ``Normalize(0.5, 0.5)``: [-1, 1];
- mask: ``Image.open(...).convert("1")`` — a DITHERED 1-bit image (Floyd-Steinberg), not a threshold —
  resized by PIL (a 1-bit image is always resized nearest), ``ToTensor``, ``>= 0.5``;
- the pipeline encodes the composite (a posterior sample), resizes the mask again to latent size with
  ``F.interpolate`` (nearest) and samples; the image is ``(x / 2 + 0.5).clamp(0, 1)``;
- refinement input at the output resolution (256): ``2 * image - 1`` resized with torchvision's antialiased
  bilinear and clamped to [-1, 1], the 1-bit mask and the composite both prepared by the loader directly
  from the files at that resolution; the result ``model(x).clamp(-1, 1)``, ``(x + 1) / 2``, a 256 square.

The pack's own path differs on purpose (a float mask thresholded once, float resizing, the aspect ratio
kept, the result pasted back at the composite's size); this module exists so that a reproduction of the
paper's Table 1 differs from the authors' run only by the documented random draws (``pipeline.stream_seed``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..core import images
from ..core.errors import InputError
from . import condition_vae as cv
from . import pipeline as dh
from .refiner import check_refine_resolution
from .refiner import refiner_input as stack


@dataclass
class OfficialInputs:
    """What the authors' loader returns for one composite: ``[1,3,R,R]`` / ``[1,1,R,R]`` at the working
    resolution, and the same at the output (refinement) resolution."""

    composite: torch.Tensor
    mask: torch.Tensor
    composite_out: torch.Tensor
    mask_out: torch.Tensor


def _pil_resized(img, res: int):
    if img.size == (res, res):  # the loader leaves an image of the right size alone
        return img
    return img.resize((res, res), Image.BILINEAR)  # torchvision's TF.resize on a PIL image; "1" -> nearest


def _rgb_tensor(img) -> torch.Tensor:
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous().float().div(255)
    return ((x - 0.5) / 0.5)[None]  # Normalize([0.5], [0.5])


def _bit_tensor(img) -> torch.Tensor:
    x = torch.from_numpy(np.array(img, dtype=np.uint8) * 255).float().div(255)  # ToTensor of a "1" image
    return (x >= 0.5).float()[None, None]


def prepare(composite, mask, resolution: int, output_resolution: int = 256) -> OfficialInputs:
    """The loader's tensors from PIL images: ``composite`` as opened (any mode; converted to RGB) and
    ``mask`` as opened (converted to a dithered 1-bit image here, as the loader does)."""
    if resolution % 8 or resolution < 8:
        raise InputError(f"resolution must be a positive multiple of 8, got {resolution}")
    comp = composite.convert("RGB")
    bits = mask.convert("1")
    if comp.size != bits.size:
        raise InputError(f"the mask is {bits.size[0]}x{bits.size[1]} but the composite is "
                         f"{comp.size[0]}x{comp.size[1]}")
    return OfficialInputs(_rgb_tensor(_pil_resized(comp, resolution)), _bit_tensor(_pil_resized(bits, resolution)),
                          _rgb_tensor(_pil_resized(comp, output_resolution)),
                          _bit_tensor(_pil_resized(bits, output_resolution)))


def prepare_files(composite_path, mask_path, resolution: int, output_resolution: int = 256) -> OfficialInputs:
    """``prepare`` on the files as the loader opens them."""
    with Image.open(composite_path) as comp, Image.open(mask_path) as mask:
        return prepare(comp, mask, resolution, output_resolution)


def prepare_tensors(composite: torch.Tensor, mask: torch.Tensor, resolution: int,
                    output_resolution: int = 256) -> OfficialInputs:
    """``prepare`` from a ComfyUI IMAGE and MASK (batch of one): both brought to the 8-bit images a file
    would hold (rounded), the mask as a greyscale image that the loader's ``convert("1")`` then dithers."""
    composite, mask = images.image_and_mask(composite, mask)
    if composite.shape[0] != 1:
        raise InputError(f"official preprocessing takes one composite at a time, got a batch of {composite.shape[0]}")
    rgb = (composite[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    grey = (mask[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return prepare(Image.fromarray(rgb, "RGB"), Image.fromarray(grey, "L"), resolution, output_resolution)


def latent_mask(mask: torch.Tensor, vae_scale_factor: int) -> torch.Tensor:
    """The pipeline's second resize: ``F.interpolate`` (nearest) to latent size, ``[B,h,w]``."""
    h, w = mask.shape[-2] // vae_scale_factor, mask.shape[-1] // vae_scale_factor
    return F.interpolate(mask, size=(h, w))[:, 0]


def refiner_input(image01: torch.Tensor, inputs: OfficialInputs, in_channels: int) -> torch.Tensor:
    """The refinement input the authors' script builds from the pipeline's ``[B,3,R,R]`` image in [0, 1]."""
    x = 2 * image01 - 1
    size = tuple(inputs.composite_out.shape[-2:])
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(-1, 1)
    return stack(x, inputs.composite_out.to(x), inputs.mask_out.to(x), in_channels)


@torch.no_grad()
def harmonize(sd, inputs: OfficialInputs, seed: int = 0, steps: int = dh.DEFAULT_STEPS,
              scheduler: str = "euler_ancestral", guidance: float = 1.0, refiner=None, condition_vae=None,
              callback=None, cancel=None) -> torch.Tensor:
    """DiffHarmony on the loader's tensors, as the authors' inference script runs it. Returns the result as
    they save it before quantisation: an IMAGE ``[1, out, out, 3]`` (refined) or ``[1, R, R, 3]`` (without a
    refiner), with no background pasted back. Random draws come from the seed's streams."""
    vae = condition_vae if condition_vae is not None else sd.vae
    latents = dh.encode_signed(vae, inputs.composite, seed, cancel=cancel)
    m = latent_mask(inputs.mask, sd.vae_scale_factor)
    out = dh.sample(sd, latents, m, seed, steps, scheduler, guidance, callback=callback)
    device = dh.module_device(vae)
    z = out.to(device=device, dtype=vae.dtype)
    if condition_vae is None:
        x = sd.vae.decode(z).sample
    else:
        cond = torch.cat([inputs.composite, inputs.mask], dim=1)
        x = cv.decode_signed(condition_vae, z, cond, dh.generator(seed, "condition"))
    image01 = (x.float() / 2 + 0.5).clamp(0, 1).cpu()
    if refiner is not None:
        rdev = dh.module_device(refiner)
        rin = refiner_input(image01, inputs, refiner.config["in_channels"])
        y = refiner(rin.to(device=rdev, dtype=next(refiner.parameters()).dtype)).float().cpu().clamp(-1, 1)
        image01 = ((y + 1) / 2).clamp(0, 1)
    return images.to_nhwc(image01).contiguous()


def harmonize_images(sd, composite: torch.Tensor, mask: torch.Tensor, resolution: int = dh.DEFAULT_RESOLUTION,
                     output_resolution: int = 256, seed: int = 0, steps: int = dh.DEFAULT_STEPS,
                     scheduler: str = "euler_ancestral", guidance: float = 1.0, refiner=None, condition_vae=None,
                     callback=None, cancel=None) -> torch.Tensor:
    """``harmonize`` on a ComfyUI IMAGE batch and MASK (one mask may serve every composite): each composite
    prepared as the authors' loader prepares its file (``prepare_tensors``), all of them checked before any
    model runs, then run one at a time with the same seed, as the authors' script runs a batch of one.
    Returns IMAGE ``[B, output_resolution, output_resolution, 3]`` with a refiner, else ``[B, R, R, 3]``.
    ``callback(step, total)`` counts the steps of the whole batch."""
    if refiner is not None:
        check_refine_resolution(output_resolution)
    composite, mask = images.image_and_mask(composite, mask)
    batch = [prepare_tensors(composite[i:i + 1], mask[i:i + 1], resolution, output_resolution)
             for i in range(composite.shape[0])]
    outs = []
    for i, inputs in enumerate(batch):
        step = None if callback is None else (lambda k, n, i=i: callback(i * n + k, len(batch) * n))
        outs.append(harmonize(sd, inputs, seed, steps, scheduler, guidance, refiner, condition_vae, step, cancel))
    return torch.cat(outs)
