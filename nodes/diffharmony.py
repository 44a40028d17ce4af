"""DiffHarmony as ComfyUI nodes: one node per stage, and an all-in-one node."""
from __future__ import annotations

import torch

from ..pipelines.diffharmony import pipeline as dh
from ..pipelines.sd import loading
from ..pipelines.diffharmony import refiner as rf
from . import host
from .widgets import (DETAIL, DIFFHARMONY_GUIDANCE, DIFFHARMONY_MODEL, DIFFHARMONY_RESOLUTION, DIFFHARMONY_STEPS,
                      DTYPE, FEATHER, FIT, FITS, REFINE_RESOLUTION, REFINER, SCHEDULER, SEED)

CATEGORY = "harmonize/DiffHarmony"
ALIASES = ("harmonize", "harmonization", "diffharmony", "color match", "relight", "composite", "blend")
MODEL_FOLDERS = ("diffharmony", "diffusers", "checkpoints")

def _model_choices() -> dict[str, object]:
    return host.sd_model_choices(MODEL_FOLDERS)


def _refiner_choices() -> dict[str, object]:
    return {f"diffharmony/{k}": v for k, v in rf.find_refiners(host.model_roots("diffharmony")).items()}


def _on_device(sd: loading.SDComponents) -> loading.SDComponents:
    """Hand the model to ComfyUI's model management (or move it) before a run."""
    container = sd.cache.get("module")
    if container is None:
        container = sd.cache["module"] = torch.nn.ModuleDict(sd.modules())
    host.load_to_device(container)
    return sd


class HarmonizeDiffHarmonyLoader:
    DESCRIPTION = ("Loads DiffHarmony: the authors' archive as downloaded (its base/ folder), any diffusers "
                   "inpainting folder, or a single-file inpainting .safetensors. Searches models/diffharmony, "
                   "models/diffusers and models/checkpoints.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (DIFFHARMONY_MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    OUTPUT_TOOLTIPS = ("The DiffHarmony model (UNet, VAE, text encoder), for the DiffHarmony nodes.",)
    SEARCH_ALIASES = ALIASES + ("loader", "inpainting model", "checkpoint")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (sorted(_model_choices()), {"tooltip": "DiffHarmony archive folder, diffusers folder or "
                                                            ".safetensors inpainting checkpoint."}),
            "dtype": DTYPE,
        }}

    def load(self, model, dtype):
        path = host.resolve_choice(model, _model_choices(), "model", MODEL_FOLDERS)
        return (dh.load_diffharmony(path, host.dtype_for(dtype), tokenizer_dir=host.comfy_tokenizer_dir()),)


class HarmonizeDiffHarmonyEncode:
    DESCRIPTION = ("VAE-encodes the WHOLE composite at the working resolution: the condition of DiffHarmony's "
                   "UNet (a sample of the latent distribution, as the official code does).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("composite_latent",)
    OUTPUT_TOOLTIPS = ("The composite's latent at the working size: the condition of the sampler.",)
    SEARCH_ALIASES = ALIASES + ("vae encode", "encode")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (DIFFHARMONY_MODEL, {"tooltip": "From the DiffHarmony loader."}),
            "composite": ("IMAGE", {"tooltip": "The composite image (foreground pasted on the background)."}),
            "resolution": DIFFHARMONY_RESOLUTION, "fit": FIT, "seed": SEED,
        }}

    def encode(self, model, composite, resolution, fit, seed):
        sd = _on_device(model)
        return ({"samples": dh.encode(sd, composite, resolution, seed, square=fit == FITS[1],
                                      cancel=host.check_interrupt)},)


class HarmonizeMaskToLatent:
    DESCRIPTION = "Binarises the mask at 0.5 and downsamples it (nearest) to the latent's size."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("latent_mask",)
    OUTPUT_TOOLTIPS = ("The mask at the latent's size, 0 or 1.",)
    SEARCH_ALIASES = ALIASES + ("mask", "downsample mask", "latent mask")
    FUNCTION = "downsample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mask": ("MASK", {"tooltip": "Foreground mask (white = the pasted object)."}),
            "latent": ("LATENT", {"tooltip": "The composite latent whose size the mask is brought to."}),
        }}

    def downsample(self, mask, latent):
        return (dh.latent_mask(mask, latent["samples"].shape[-2:]),)


class HarmonizeDiffHarmonySampler:
    DESCRIPTION = ("Denoises from pure noise conditioned on the composite latent and the mask (9-channel "
                   "inpainting UNet). DiffHarmony's settings: Euler ancestral, 5 steps, guidance 1, empty prompt.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "sample"
    OUTPUT_TOOLTIPS = ("The harmonized latent (unscaled, as ComfyUI's LATENT).",)
    SEARCH_ALIASES = ALIASES + ("sampler", "ksampler", "euler ancestral", "denoise")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (DIFFHARMONY_MODEL, {"tooltip": "From the DiffHarmony loader."}),
            "composite_latent": ("LATENT", {"tooltip": "From Harmonize: DiffHarmony Encode."}),
            "latent_mask": ("MASK", {"tooltip": "From Harmonize: Mask To Latent."}),
            "seed": SEED,
            "steps": DIFFHARMONY_STEPS, "scheduler": SCHEDULER, "guidance": DIFFHARMONY_GUIDANCE,
        }, "optional": {
            "prompt": ("STRING", {"default": "", "multiline": False, "tooltip": "Text condition (paper: empty)."}),
        }}

    def sample(self, model, composite_latent, latent_mask, seed, steps, scheduler, guidance, prompt=""):
        sd = _on_device(model)
        out = dh.sample(sd, composite_latent["samples"], latent_mask, seed, steps, scheduler, guidance, prompt,
                        callback=host.Progress(steps))
        return ({"samples": out},)


class HarmonizeDiffHarmonyDecode:
    DESCRIPTION = "Decodes latents with the DiffHarmony model's VAE."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("harmonized",)
    FUNCTION = "decode"
    OUTPUT_TOOLTIPS = ("The harmonized image at the working size.",)
    SEARCH_ALIASES = ALIASES + ("vae decode", "decode")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (DIFFHARMONY_MODEL, {"tooltip": "From the DiffHarmony loader."}),
            "latent": ("LATENT", {"tooltip": "From Harmonize: DiffHarmony Sampler."}),
        }}

    def decode(self, model, latent):
        return (dh.decode(_on_device(model), latent["samples"], cancel=host.check_interrupt),)


class HarmonizeRefinerLoader:
    DESCRIPTION = "Loads DiffHarmony's refinement UNet (the archive's refinement/ folder) from models/diffharmony."
    CATEGORY = CATEGORY
    RETURN_TYPES = (REFINER,)
    RETURN_NAMES = ("refiner",)
    OUTPUT_TOOLTIPS = ("The refinement UNet, for Harmonize: Refine or the all-in-one node.",)
    SEARCH_ALIASES = ALIASES + ("refiner", "refinement", "loader")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "refiner": (sorted(_refiner_choices()), {"tooltip": "A refinement/ folder (config.json + "
                                                                "diffusion_pytorch_model.safetensors)."}),
            "dtype": DTYPE,
        }}

    def load(self, refiner, dtype):
        path = host.resolve_choice(refiner, _refiner_choices(), "refiner", ("diffharmony",))
        return (rf.load_refiner(path, host.dtype_for(dtype)),)


class HarmonizeRefine:
    DESCRIPTION = ("Residual refinement: predicts a correction of the harmonized image from [harmonized, mask, "
                   "composite] at a low resolution (paper: 256), sharpening what the VAE blurred.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("refined",)
    OUTPUT_TOOLTIPS = ("The refined image at the refinement resolution.",)
    SEARCH_ALIASES = ALIASES + ("refine", "refinement", "sharpen")
    FUNCTION = "refine"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "refiner": (REFINER, {"tooltip": "From Harmonize: Refiner Loader."}),
            "harmonized": ("IMAGE", {"tooltip": "The decoded DiffHarmony result."}),
            "composite": ("IMAGE", {"tooltip": "The original composite."}),
            "mask": ("MASK", {"tooltip": "Foreground mask."}),
            "resolution": REFINE_RESOLUTION,
            "fit": FIT,
        }}

    def refine(self, refiner, harmonized, composite, mask, resolution, fit):
        device = host.load_to_device(refiner)
        return (rf.refine(refiner, harmonized, composite, mask, resolution, device=device, square=fit == FITS[1],
                          cancel=host.check_interrupt),)


class HarmonizeDiffHarmony:
    DESCRIPTION = ("DiffHarmony in one node: encode, sample, decode, optional refinement, and paste back at the "
                   "composite's size. Same result as the stage nodes for the same settings.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "harmonize"
    OUTPUT_TOOLTIPS = ("The harmonized composite at its own size; outside the mask the composite bit for bit.",)
    SEARCH_ALIASES = ALIASES + ("all-in-one", "harmonizer", "image harmonization")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (DIFFHARMONY_MODEL, {"tooltip": "From the DiffHarmony loader."}),
            "composite": ("IMAGE", {"tooltip": "The composite image."}),
            "mask": ("MASK", {"tooltip": "Foreground mask (white = the pasted object)."}),
            "seed": SEED, "steps": DIFFHARMONY_STEPS, "scheduler": SCHEDULER, "guidance": DIFFHARMONY_GUIDANCE,
            "resolution": DIFFHARMONY_RESOLUTION, "fit": FIT, "refine_resolution": REFINE_RESOLUTION,
            "feather": FEATHER, "detail": DETAIL,
        }, "optional": {
            "refiner": (REFINER, {"tooltip": "Optional refinement model (recommended)."}),
        }}

    def harmonize(self, model, composite, mask, seed, steps, scheduler, guidance, resolution, fit,
                  refine_resolution, feather, detail, refiner=None):
        sd = _on_device(model)
        if refiner is not None:
            host.load_to_device(refiner)
        out = dh.harmonize(sd, composite, mask, seed=seed, steps=steps, resolution=resolution, scheduler=scheduler,
                           guidance=guidance, square=fit == FITS[1], refiner=refiner,
                           refine_resolution=refine_resolution, feather=feather, detail=detail,
                           callback=host.Progress(steps), cancel=host.check_interrupt)
        return (out,)


NODE_CLASS_MAPPINGS = {c.__name__: c for c in (
    HarmonizeDiffHarmonyLoader, HarmonizeDiffHarmonyEncode, HarmonizeMaskToLatent, HarmonizeDiffHarmonySampler,
    HarmonizeDiffHarmonyDecode, HarmonizeRefinerLoader, HarmonizeRefine, HarmonizeDiffHarmony)}
NODE_DISPLAY_NAME_MAPPINGS = {
    "HarmonizeDiffHarmonyLoader": "Harmonize: DiffHarmony Loader",
    "HarmonizeDiffHarmonyEncode": "Harmonize: DiffHarmony Encode",
    "HarmonizeMaskToLatent": "Harmonize: Mask To Latent",
    "HarmonizeDiffHarmonySampler": "Harmonize: DiffHarmony Sampler",
    "HarmonizeDiffHarmonyDecode": "Harmonize: DiffHarmony Decode",
    "HarmonizeRefinerLoader": "Harmonize: Refiner Loader",
    "HarmonizeRefine": "Harmonize: Refine",
    "HarmonizeDiffHarmony": "Harmonize: DiffHarmony (all-in-one)",
}
