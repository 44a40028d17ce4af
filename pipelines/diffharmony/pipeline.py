"""DiffHarmony (Zhou et al., ICMR 2024): harmonization with a fine-tuned Stable Diffusion inpainting UNet.

As the official inference code does it (reference/diffharmony.md):
- the condition is the VAE latent of the WHOLE composite, ``latent_dist.sample(generator) * scaling_factor``
  of the image in [-1, 1];
- the mask is binarised at 0.5 and resized to latent size with nearest-neighbour interpolation;
- the UNet input at each step is ``concat([scaled noisy latents, mask, composite latents])`` (9 channels);
- start from pure noise ``* init_noise_sigma``; Euler-ancestral, 5 steps, guidance 1.0 (one UNet pass per
  step); the text condition is the CLIP embedding of the empty prompt (computed once, cached);
- decode, ``(x / 2 + 0.5).clamp(0, 1)``.
Differences, by design: the working size keeps the aspect ratio (long side = resolution, sides multiples of
8; ``square=True`` gives the official square resize); each stage draws from its own random stream derived
from the one seed (``stream_seed``), so the stage nodes and the all-in-one node give the same result for the
same seed. The official script threads one generator through start noise, the encode draw, the sampler steps
and the condition VAE's draw; seeding each stage's generator with the seed itself would make the encode draw
and the start noise the same tensor (both are the first draw of the same stream), so they are derived apart.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
from typing import Callable

import torch
import torch.nn.functional as F

# diffusers and transformers are imported where first used: importing them adds seconds to ComfyUI's start-up
# (which imports every node module), while a graph that never loads this model does not need them.
from ..core import cancel as cancelling
from ..core import images
from ..color.restore import check_detail, restore_unchecked
from ..core.errors import InputError, WeightsError
from ..sd.loading import SDComponents
from ..sd.models import load_sd
from ..sd.prompts import prompt_embedding
from . import condition_vae as cv
from .refiner import check_refine_resolution, refine_unchecked

SCHEDULERS = ("euler_ancestral", "euler", "ddim", "dpmpp_2m", "unipc")
DEFAULT_STEPS = 5
DEFAULT_RESOLUTION = 1024
VAE_TILING_ABOVE = 2048  # working long side (px) above which the VAE runs in overlapping tiles
Callback = Callable[[int, int], None]
STREAMS = ("noise", "encode", "condition")


def stream_seed(seed: int, stream: str) -> int:
    """The seed of one random stream of a run, derived from the user's seed.

    ``noise`` (start noise, then one draw per ancestral step) uses the seed itself; every other stream
    (``encode``: the VAE-posterior draw of the composite; ``condition``: the condition VAE's posterior draw)
    uses the first 8 bytes (little-endian, top bit cleared) of SHA-256 of ``"<seed>/<stream>"``. The streams
    are thus independent, yet fixed by the one seed, whichever nodes run them."""
    if stream not in STREAMS:
        raise InputError(f"unknown random stream {stream!r}; expected one of {', '.join(STREAMS)}")
    if stream == "noise":
        return int(seed)
    digest = hashlib.sha256(f"{int(seed)}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator for ``stream`` of a run with ``seed`` (see ``stream_seed``)."""
    return torch.Generator("cpu").manual_seed(stream_seed(seed, stream))


def load_diffharmony(path, dtype: torch.dtype = torch.float32, tokenizer_dir=None) -> SDComponents:
    """Load the DiffHarmony archive (``base/``), a diffusers inpainting folder or a single-file inpainting
    checkpoint, and check it is a 9-channel inpainting UNet."""
    sd = load_sd(path, dtype=dtype, tokenizer_dir=tokenizer_dir)
    check_inpainting(sd)
    return sd


def check_and_return(sd: SDComponents) -> SDComponents:
    check_inpainting(sd)
    return sd


def check_inpainting(sd: SDComponents) -> None:
    need = 2 * sd.latent_channels + 1
    got = sd.unet.config.in_channels
    if got != need:
        raise WeightsError(
            f"{sd.source}: the UNet has in_channels={got}, but DiffHarmony needs an inpainting UNet with "
            f"in_channels={need} (noisy latent + mask + composite latent). A text-to-image checkpoint "
            f"(in_channels=4) cannot be used here."
        )


def make_scheduler(name: str, scheduler_config: dict):
    """A diffusers scheduler built from the model's own scheduler config."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, UniPCMultistepScheduler)

    classes = {"euler_ancestral": EulerAncestralDiscreteScheduler, "euler": EulerDiscreteScheduler,
               "ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}
    if name not in classes:
        raise InputError(f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}")
    return classes[name].from_config(scheduler_config)


def module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@contextlib.contextmanager
def vae_tiling(vae, long_side: int):
    """diffusers' tiled VAE (and the condition VAE's tiling, condition_vae.py) for working sizes above
    ``VAE_TILING_ABOVE`` (memory stays bounded at 2-4k px); the paper's 512/1024 path is untouched. The
    model's own setting is restored afterwards."""
    turn_on = (long_side > VAE_TILING_ABOVE and hasattr(vae, "enable_tiling")
               and not getattr(vae, "use_tiling", False))
    if turn_on:
        vae.enable_tiling()
    try:
        yield
    finally:
        if turn_on:
            vae.disable_tiling()


def working_size(height: int, width: int, resolution: int, square: bool, sd: SDComponents) -> tuple[int, int]:
    return images.fit_size(height, width, resolution, multiple=sd.vae_scale_factor, square=square)


@torch.no_grad()
def encode(sd: SDComponents, image: torch.Tensor, resolution: int = DEFAULT_RESOLUTION, seed: int = 0,
           square: bool = False, sample: bool = True, vae=None, cancel: cancelling.Cancel = None) -> torch.Tensor:
    """IMAGE ``[B,H,W,3]`` -> UNSCALED latents ``[B,4,h/8,w/8]`` of the composite at the working size.
    ``sample=True`` draws from the latent distribution with the ``encode`` stream of ``seed`` (official: a
    sample); ``False`` takes its mode. ``vae`` encodes instead of the model's own (the authors' pipeline
    encodes with the condition VAE's encoder when it decodes with one). ``cancel`` is checked before every
    block of the VAE encoder."""
    return encode_unchecked(sd, images.image_batch(image), resolution, seed, square, sample, vae, cancel)


def encode_unchecked(sd: SDComponents, image: torch.Tensor, resolution: int = DEFAULT_RESOLUTION, seed: int = 0,
                     square: bool = False, sample: bool = True, vae=None,
                     cancel: cancelling.Cancel = None) -> torch.Tensor:
    """:func:`encode` on an IMAGE already checked (``images.image_batch``)."""
    size = working_size(image.shape[1], image.shape[2], resolution, square, sd)
    return encode_signed(vae if vae is not None else sd.vae, images.to_signed(images.resize_images(image, size)),
                         seed, sample, cancel)


@torch.no_grad()
def encode_signed(vae, x: torch.Tensor, seed: int = 0, sample: bool = True,
                  cancel: cancelling.Cancel = None) -> torch.Tensor:
    """``[B,3,H,W]`` in [-1, 1] at the working size -> UNSCALED latents (see ``encode``)."""
    x = x.to(device=module_device(vae), dtype=vae.dtype)
    with vae_tiling(vae, max(x.shape[-2:])), cancelling.inside(vae, cancel):
        dist = vae.encode(x).latent_dist
    if not sample:
        return dist.mode().float().cpu()
    noise = torch.randn(dist.mean.shape, generator=generator(seed, "encode"), dtype=torch.float32)
    return (dist.mean + dist.std * noise.to(device=dist.mean.device, dtype=dist.mean.dtype)).float().cpu()


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """MASK ``[B,H,W]`` -> ``[B,h,w]`` in {0,1}: binarised at 0.5, then nearest-neighbour to latent size."""
    if mask.dim() == 2:
        mask = mask[None]
    binary = (mask.float() >= 0.5).float()
    return F.interpolate(binary[:, None], size=tuple(latent_size), mode="nearest")[:, 0]


@torch.no_grad()
def sample(sd: SDComponents, composite_latents: torch.Tensor, mask_latent: torch.Tensor, seed: int = 0,
           steps: int = DEFAULT_STEPS, scheduler: str = "euler_ancestral", guidance: float = 1.0,
           prompt: str = "", negative_prompt: str = "", callback: Callback | None = None) -> torch.Tensor:
    """Denoise from pure noise conditioned on the composite latents (UNSCALED, ``[B,4,h,w]``) and the
    latent-size mask (``[B,h,w]`` or ``[1,h,w]``). Returns UNSCALED latents.

    guidance > 1 runs classifier-free guidance between ``prompt`` and ``negative_prompt``; when the two
    prompts are equal (DiffHarmony's empty prompt) guidance cannot change the result, so one pass is run.
    """
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    b, _, h, w = composite_latents.shape
    if mask_latent.dim() == 2:
        mask_latent = mask_latent[None]
    if tuple(mask_latent.shape[-2:]) != (h, w):
        raise InputError(f"latent mask is {tuple(mask_latent.shape[-2:])} but the latents are {(h, w)}: "
                         f"downsample the mask to the latent size first")
    if mask_latent.shape[0] not in (1, b):
        raise InputError(f"batch mismatch: {b} latents but {mask_latent.shape[0]} latent masks")
    unet = sd.unet
    device, dtype = module_device(unet), unet.dtype
    sf = sd.vae.config.scaling_factor
    cond = (composite_latents.float() * sf).to(device=device, dtype=dtype)
    mask = mask_latent.float()[:, None].expand(b, 1, h, w).to(device=device, dtype=dtype)
    cfg = guidance > 1.0 and prompt != negative_prompt
    emb = prompt_embedding(sd, prompt)
    if cfg:
        emb = torch.cat([prompt_embedding(sd, negative_prompt), emb])
    emb = emb.expand(b * (2 if cfg else 1), *emb.shape[1:]).to(dtype)

    sched = make_scheduler(scheduler, sd.scheduler_config)
    sched.set_timesteps(steps, device=device)
    gen = generator(seed, "noise")
    latents = torch.randn((b, sd.latent_channels, h, w), generator=gen, dtype=torch.float32)
    latents = (latents * sched.init_noise_sigma).to(device=device, dtype=dtype)
    step_kwargs = {"generator": gen} if "generator" in inspect.signature(sched.step).parameters else {}
    for i, t in enumerate(sched.timesteps):
        x = torch.cat([sched.scale_model_input(latents, t), mask, cond], dim=1)
        if cfg:
            x = torch.cat([x, x])
        eps = unet(x, t, encoder_hidden_states=emb).sample
        if cfg:
            uncond, text = eps.chunk(2)
            eps = uncond + guidance * (text - uncond)
        latents = sched.step(eps, t, latents, **step_kwargs).prev_sample
        if callback is not None:
            callback(i + 1, steps)
    return (latents.float() / sf).cpu()


@torch.no_grad()
def decode(sd: SDComponents, latents: torch.Tensor, cancel: cancelling.Cancel = None) -> torch.Tensor:
    """UNSCALED latents -> IMAGE ``[B,H,W,3]`` in 0..1. ``cancel`` is checked before every block of the
    VAE decoder."""
    device, dtype = module_device(sd.vae), sd.vae.dtype
    with vae_tiling(sd.vae, max(latents.shape[-2:]) * sd.vae_scale_factor), cancelling.inside(sd.vae, cancel):
        x = sd.vae.decode(latents.to(device=device, dtype=dtype)).sample
    return images.from_signed(x)


@torch.no_grad()
def decode_with_condition(cvae, latents: torch.Tensor, composite: torch.Tensor, mask: torch.Tensor,
                          seed: int = 0, cancel: cancelling.Cancel = None) -> torch.Tensor:
    """UNSCALED latents -> IMAGE with DiffHarmony's condition VAE (condition_vae.py): the decoder also sees
    the whole composite and the binarised mask, resized to the working size the latents have (8x their size,
    so the composite is resized exactly as ``encode`` resized it, keep-aspect or square); the condition's
    posterior is sampled from the ``condition`` stream of ``seed``, as the authors' pipeline samples it."""
    composite, mask = images.image_and_mask(composite, mask)
    return decode_with_condition_unchecked(cvae, latents, composite, mask, seed, cancel)


@torch.no_grad()
def decode_with_condition_unchecked(cvae, latents: torch.Tensor, composite: torch.Tensor, mask: torch.Tensor,
                                    seed: int = 0, cancel: cancelling.Cancel = None) -> torch.Tensor:
    """:func:`decode_with_condition` on a composite and mask already checked (``images.image_and_mask``)."""
    size = (latents.shape[-2] * cvae.scale_factor, latents.shape[-1] * cvae.scale_factor)
    with vae_tiling(cvae, max(size)), cancelling.inside(cvae, cancel):
        return cv.decode(cvae, latents, composite, mask, generator=generator(seed, "condition"),
                         cond=cv.condition_unchecked(composite, mask, size))


def harmonize(sd: SDComponents, image: torch.Tensor, mask: torch.Tensor, seed: int = 0,
              steps: int = DEFAULT_STEPS, resolution: int = DEFAULT_RESOLUTION, scheduler: str = "euler_ancestral",
              guidance: float = 1.0, square: bool = False, refiner=None, refine_resolution: int = 256,
              feather: int = 0, detail: str = "resample", callback: Callback | None = None,
              cancel: cancelling.Cancel = None, condition_vae=None) -> torch.Tensor:
    """The whole system: encode -> mask to latent size -> sample -> decode -> (refine) -> restore.

    With ``condition_vae`` the composite is encoded with its encoder and the result decoded with it, as the
    authors' pipeline does when given one. Returns an IMAGE at the composite's size with the background
    (mask == 0) bit-identical to the input. Composites whose mask is empty are returned unchanged (with a
    warning). ``callback`` is called after every sampler step; ``cancel`` is checked inside the encode,
    decode and refiner passes and per strip of the paste (see the stages).
    """

    # every input is checked here, once, before any work; the stages below trust them (core/images.py)
    image, mask = images.image_and_mask(image, mask)
    check_detail(detail)
    if refiner is not None:
        check_refine_resolution(refine_resolution)
    empty = images.warn_empty(mask, "DiffHarmony")
    if bool(empty.all()):
        return image.clone()
    latents = encode_unchecked(sd, image, resolution, seed, square, vae=condition_vae, cancel=cancel)
    m = latent_mask(mask, latents.shape[-2:])
    out = sample(sd, latents, m, seed, steps, scheduler, guidance, callback=callback)
    if condition_vae is None:
        harmonized = decode(sd, out, cancel)
    else:
        harmonized = decode_with_condition_unchecked(condition_vae, out, image, mask, seed, cancel)
    if refiner is not None:
        harmonized = refine_unchecked(refiner, harmonized, image, mask, refine_resolution,
                                      device=module_device(refiner), square=square, cancel=cancel)
    return restore_unchecked(harmonized, image, mask, feather=feather, detail=detail, cancel=cancel)
