"""DiffHarmony on ComfyUI's own model objects: the tensors its conditioning is made of, without ComfyUI.

DiffHarmony's UNet is a standard Stable Diffusion inpainting UNet (9 input channels: noisy latent, mask,
condition latent). ComfyUI samples such a UNet natively when the conditioning carries
``concat_latent_image`` (UNSCALED latents; ComfyUI applies the model's latent scale) and ``concat_mask``. What
makes it DiffHarmony rather than inpainting (reference/diffharmony.md):

- the condition latent is the latent of the WHOLE, unmasked composite. ComfyUI's stock
  ``InpaintModelConditioning`` greys the masked pixels before encoding (the foreground's colours, which
  DiffHarmony re-lights, would be lost) and sets a noise mask that locks the background during sampling;
- the mask is binarised at 0.5 and brought to latent size by nearest-neighbour (ComfyUI would resize a mask
  of another size bilinearly and round); this module gives it at latent size, so ComfyUI uses it as is;
- sampling starts from pure noise: the LATENT handed to KSampler is all zeros (KSampler adds noise to it);
- the text condition is the empty prompt; ``euler_ancestral`` / ``normal`` / 5 steps / cfg 1.0.

The node layer (nodes/diffharmony.py) encodes with ComfyUI's VAE and CLIP through nodes/host.py.
"""
from __future__ import annotations

import torch

from ..core import images
from ..core.errors import InputError
from .pipeline import DEFAULT_RESOLUTION, latent_mask

LATENT_FACTOR = 8  # SD VAEs: 8 pixels per latent cell
SAMPLER, SCHEDULER, STEPS, CFG = "euler_ancestral", "normal", 5, 1.0  # the paper's sampler in ComfyUI's names


def check_fit(unet_in_channels: int | None, model_latent_channels: int, vae_latent_channels: int) -> None:
    """DiffHarmony needs an inpainting UNet (``2 * latent + 1`` input channels) and a VAE whose latents are
    the UNet's. Raise InputError naming what is wrong and what is needed, before any work."""
    need = 2 * model_latent_channels + 1
    if unet_in_channels != need:
        kind = "a text-to-image UNet" if unet_in_channels == model_latent_channels else "this UNet"
        raise InputError(
            f"the MODEL has {unet_in_channels} input channels ({kind}), but DiffHarmony needs an inpainting UNet "
            f"with {need}: {model_latent_channels} noisy-latent + 1 mask + {model_latent_channels} composite-latent "
            f"channels. Load the DiffHarmony archive (base/), an SD inpainting checkpoint or folder.")
    if vae_latent_channels != model_latent_channels:
        raise InputError(
            f"the VAE makes {vae_latent_channels}-channel latents but the MODEL works on {model_latent_channels}: "
            f"use the VAE that belongs to the model (the DiffHarmony archive's base/vae, or the checkpoint's).")


def working_size(height: int, width: int, resolution: int = DEFAULT_RESOLUTION, square: bool = False):
    """The size the composite is encoded at: long side = ``resolution`` (aspect kept, sides multiples of 8),
    or ``resolution`` x ``resolution`` (the official square resize)."""
    return images.fit_size(height, width, resolution, multiple=LATENT_FACTOR, square=square)


def prepare(image: torch.Tensor, mask: torch.Tensor, resolution: int = DEFAULT_RESOLUTION,
            square: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IMAGE + MASK -> (pixels at the working size ``[B,h,w,3]`` 0..1, the latent-size binary mask
    ``[B,1,h/8,w/8]``, which items have an empty mask ``[B]``). Inputs are validated and never modified.

    The pixels are resized exactly as the pack's own DiffHarmony Encode does, and the mask goes to latent size
    from the composite-size mask exactly as its Mask To Latent does, so both paths condition on the same
    tensors."""
    image, mask = images.image_and_mask(image, mask)
    empty = images.warn_empty(mask, "DiffHarmony")
    size = working_size(image.shape[1], image.shape[2], resolution, square)
    pixels = images.resize_images(image, size)
    m = latent_mask(mask, (size[0] // LATENT_FACTOR, size[1] // LATENT_FACTOR))[:, None]
    return pixels, m, empty


def empty_latent_like(latent: torch.Tensor) -> dict:
    """The LATENT KSampler starts from: all zeros, so what it samples from is pure noise."""
    return {"samples": torch.zeros_like(latent)}
