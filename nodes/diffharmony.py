"""DiffHarmony as ComfyUI nodes: one node per stage, and an all-in-one node."""
from __future__ import annotations

import torch

from ..pipelines.diffharmony import native
from ..pipelines.diffharmony import pipeline as dh
from ..pipelines.sd import loading
from ..pipelines.diffharmony import refiner as rf
from ..pipelines.diffharmony import condition_vae as cv
from ..pipelines.diffharmony import inverse as inv
from ..pipelines.diffharmony import official
from ..pipelines.core.errors import InputError
from . import host
from .widgets import (CONDITION_VAE, DECODER, DECODERS, DETAIL, DIFFHARMONY_GUIDANCE, DIFFHARMONY_MODEL,
                      DIFFHARMONY_RESOLUTION, DIFFHARMONY_STEPS, DTYPE, FEATHER, FIT, FITS, PREPROCESS, PREPROCESSING,
                      REFINE_RESOLUTION, REFINER, SCHEDULER, SEED)

CATEGORY = "harmonize/DiffHarmony"
ALIASES = ("harmonize", "harmonization", "diffharmony", "color match", "relight", "composite", "blend")
MODEL_FOLDERS = ("diffharmony", "diffusers", "checkpoints")

def _model_choices() -> dict[str, object]:
    return host.sd_model_choices(MODEL_FOLDERS)


def _refiner_choices() -> dict[str, object]:
    return {f"diffharmony/{k}": v for k, v in rf.find_refiners(host.model_roots("diffharmony")).items()}


def _condition_vae_choices() -> dict[str, object]:
    return {f"diffharmony/{k}": v for k, v in cv.find_condition_vaes(host.model_roots("diffharmony")).items()}


def _inverse_choices() -> dict[str, object]:
    """Archives (and other folders) under models/diffharmony that hold an inverse/ folder."""
    return {f"diffharmony/{k}": v for k, v in inv.find_inverse_models(host.model_roots("diffharmony")).items()}


def _condition_vae_beside(sd: loading.SDComponents):
    """The condition_vae/ beside the loaded model's base/ (loaded once, kept with the model)."""
    if "condition_vae" not in sd.cache:
        sd.cache["condition_vae"] = cv.load_condition_vae(sd.source, sd.dtype)
    return sd.cache["condition_vae"]


def _decoder(sd: loading.SDComponents, decoder: str, condition_vae=None):
    """The condition VAE to decode with (on the device), or None for the model's own VAE."""
    if decoder not in DECODERS:
        raise InputError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if decoder == "vae":
        return None
    cvae = condition_vae if condition_vae is not None else _condition_vae_beside(sd)
    host.load_to_device(cvae)
    return cvae


def _on_device(sd: loading.SDComponents, *parts: str, extra=()) -> loading.SDComponents:
    """Hand the components a stage uses (default: all) and ``extra`` modules to ComfyUI's model management
    in one load: each is a model of its own there, evictable alone."""
    names = parts or ("unet", "vae", "text_encoder")
    host.load_models(*(getattr(sd, n) for n in names), *extra)
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
        }, "optional": {
            "condition_vae": (CONDITION_VAE, {"tooltip": "Encode with the condition VAE's encoder, as the authors' "
                                                         "pipeline does when it decodes with one."}),
        }}

    def encode(self, model, composite, resolution, fit, seed, condition_vae=None):
        sd = _on_device(model, "vae", extra=(condition_vae,) if condition_vae is not None else ())
        return ({"samples": dh.encode(sd, composite, resolution, seed, square=fit == FITS[1], vae=condition_vae,
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
        sd = _on_device(model, "unet", "text_encoder")
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
        return (dh.decode(_on_device(model, "vae"), latent["samples"], cancel=host.check_interrupt),)


class HarmonizeConditionVAELoader:
    DESCRIPTION = ("Loads DiffHarmony's condition VAE (the archive's condition_vae/ folder, the authors' "
                   "DiffHarmony++) from models/diffharmony: a VAE whose decoder also sees the composite.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (CONDITION_VAE,)
    RETURN_NAMES = ("condition_vae",)
    OUTPUT_TOOLTIPS = ("The condition VAE, for Condition-VAE Decode, the Encode node or the all-in-one node.",)
    SEARCH_ALIASES = ALIASES + ("condition vae", "cvae", "diffharmony++", "loader", "sharp decode")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "condition_vae": (sorted(_condition_vae_choices()), {"tooltip": "A condition_vae/ folder (config.json "
                                                                            "+ diffusion_pytorch_model.safetensors)."}),
            "dtype": DTYPE,
        }}

    def load(self, condition_vae, dtype):
        path = host.resolve_choice(condition_vae, _condition_vae_choices(), "condition VAE", ("diffharmony",))
        return (cv.load_condition_vae(path, host.dtype_for(dtype)),)


class HarmonizeConditionVAEDecode:
    DESCRIPTION = ("Decodes the harmonized latent with DiffHarmony's condition VAE: its decoder also sees the "
                   "whole composite and the mask at the working size, so text, faces and fine texture of the "
                   "pasted object come back sharp. Its draw comes from the seed's own stream.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("harmonized",)
    OUTPUT_TOOLTIPS = ("The harmonized image at the working size.",)
    SEARCH_ALIASES = ALIASES + ("condition vae", "cvae", "vae decode", "decode", "sharp decode")
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "condition_vae": (CONDITION_VAE, {"tooltip": "From Harmonize: DiffHarmony Condition-VAE Loader."}),
            "latent": ("LATENT", {"tooltip": "From Harmonize: DiffHarmony Sampler."}),
            "composite": ("IMAGE", {"tooltip": "The composite the latent was encoded from (any size: it is "
                                               "resized to the latent's working size)."}),
            "mask": ("MASK", {"tooltip": "Foreground mask of the composite."}),
            "seed": SEED,
        }}

    def decode(self, condition_vae, latent, composite, mask, seed):
        host.load_to_device(condition_vae)
        return (dh.decode_with_condition(condition_vae, latent["samples"], composite, mask, seed,
                                         cancel=host.check_interrupt),)


class HarmonizeInverseLoader:
    DESCRIPTION = ("Loads DiffHarmony's inverse model (the archive's inverse/ folder, the authors' "
                   "diffharmony-gen): the same pipeline trained to turn a real photo into an inharmonious "
                   "composite. The VAE, text encoder and tokenizer come from base/ beside it.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (DIFFHARMONY_MODEL,)
    RETURN_NAMES = ("inverse_model",)
    OUTPUT_TOOLTIPS = ("The inverse model, for Harmonize: DiffHarmony Inverse (Make Composite) or the stage "
                       "nodes.",)
    SEARCH_ALIASES = ALIASES + ("inverse", "diffharmony-gen", "training data", "loader")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (sorted(_inverse_choices()), {"tooltip": "A DiffHarmony archive folder holding inverse/."}),
            "dtype": DTYPE,
        }}

    def load(self, model, dtype):
        path = host.resolve_choice(model, _inverse_choices(), "inverse model", ("diffharmony",))
        return (inv.load_inverse(path, host.dtype_for(dtype), tokenizer_dir=host.comfy_tokenizer_dir()),)


class HarmonizeMakeComposite:
    DESCRIPTION = ("Turns a real photo + mask into an inharmonious composite of it with DiffHarmony's inverse "
                   "model: the masked object is repainted to no longer fit, the photo is kept outside the mask. "
                   "The photo is then the ground truth of the composite: training pairs from your own photos.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("composite",)
    OUTPUT_TOOLTIPS = ("An inharmonious composite of the photo, at the photo's size.",)
    SEARCH_ALIASES = ALIASES + ("inverse", "make composite", "training data", "augment")
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "inverse_model": (DIFFHARMONY_MODEL, {"tooltip": "From Harmonize: DiffHarmony Inverse Loader."}),
            "real": ("IMAGE", {"tooltip": "A real (harmonious) photo."}),
            "mask": ("MASK", {"tooltip": "The object to make inharmonious (white)."}),
            "seed": SEED, "steps": DIFFHARMONY_STEPS, "resolution": DIFFHARMONY_RESOLUTION, "fit": FIT,
        }, "optional": {
            "condition_vae": (CONDITION_VAE, {"tooltip": "Optional: a condition VAE trained for this direction "
                                                         "(the authors' cvae-gen: harmonize-train-condition-vae "
                                                         "--mode inverse) to encode and decode with, the real "
                                                         "photo and mask as its condition."}),
        }}

    def make(self, inverse_model, real, mask, seed, steps, resolution, fit, condition_vae=None):
        sd = _on_device(inverse_model, extra=(condition_vae,) if condition_vae is not None else ())
        return (inv.make_composite(sd, real, mask, seed=seed, steps=steps, resolution=resolution,
                                   square=fit == FITS[1], condition_vae=condition_vae,
                                   callback=host.Progress(steps), cancel=host.check_interrupt),)


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
                   "composite's size. Same result as the stage nodes for the same settings. preprocess = official "
                   "instead feeds the network exactly what the authors' code feeds it and returns their square "
                   "result (for reproducing the paper's numbers).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "harmonize"
    OUTPUT_TOOLTIPS = ("The harmonized composite at its own size; outside the mask the composite bit for bit "
                       "(preprocess = official: the authors' square result).",)
    SEARCH_ALIASES = ALIASES + ("all-in-one", "harmonizer", "image harmonization", "official", "reproduce")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (DIFFHARMONY_MODEL, {"tooltip": "From the DiffHarmony loader."}),
            "composite": ("IMAGE", {"tooltip": "The composite image."}),
            "mask": ("MASK", {"tooltip": "Foreground mask (white = the pasted object)."}),
            "seed": SEED, "steps": DIFFHARMONY_STEPS, "scheduler": SCHEDULER, "guidance": DIFFHARMONY_GUIDANCE,
            "resolution": DIFFHARMONY_RESOLUTION, "fit": FIT, "refine_resolution": REFINE_RESOLUTION,
            "feather": FEATHER, "detail": DETAIL, "decoder": DECODER, "preprocess": PREPROCESS,
        }, "optional": {
            "refiner": (REFINER, {"tooltip": "Optional refinement model (recommended)."}),
            "condition_vae": (CONDITION_VAE, {"tooltip": "The condition VAE for decoder = condition vae (default: "
                                                         "condition_vae/ beside the model's base/)."}),
        }}

    def harmonize(self, model, composite, mask, seed, steps, scheduler, guidance, resolution, fit,
                  refine_resolution, feather, detail, decoder="vae", preprocess="pack", refiner=None,
                  condition_vae=None):
        if preprocess not in PREPROCESSING:
            raise InputError(f"preprocess must be one of {', '.join(PREPROCESSING)}, got {preprocess!r}")
        cvae = _decoder(model, decoder, condition_vae)
        sd = _on_device(model, extra=tuple(m for m in (refiner, cvae) if m is not None))  # one load for the run
        if preprocess == "official":
            return (official.harmonize_images(sd, composite, mask, resolution, refine_resolution, seed=seed,
                                              steps=steps, scheduler=scheduler, guidance=guidance, refiner=refiner,
                                              condition_vae=cvae, callback=host.Progress(steps),
                                              cancel=host.check_interrupt),)
        out = dh.harmonize(sd, composite, mask, seed=seed, steps=steps, resolution=resolution, scheduler=scheduler,
                           guidance=guidance, square=fit == FITS[1], refiner=refiner,
                           refine_resolution=refine_resolution, feather=feather, detail=detail,
                           callback=host.Progress(steps), cancel=host.check_interrupt, condition_vae=cvae)
        return (out,)


WEIGHT_DTYPES = {"default": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                 "fp8_e4m3fn": getattr(torch, "float8_e4m3fn", None), "fp8_e5m2": getattr(torch, "float8_e5m2", None)}


class HarmonizeDiffHarmonyNativeLoader:
    DESCRIPTION = ("Loads DiffHarmony as ComfyUI's own MODEL, CLIP and VAE (one model-management entry each, so "
                   "ComfyUI can evict them separately, load them partially when memory is short, and store the "
                   "UNet in fp8), for ComfyUI's KSampler with Harmonize: DiffHarmony Conditioning. Reads the "
                   "authors' archive as downloaded (base/), a diffusers inpainting folder or a single-file "
                   "inpainting checkpoint.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("model", "clip", "vae")
    OUTPUT_TOOLTIPS = ("DiffHarmony's 9-channel inpainting UNet, for KSampler.",
                       "The text encoder (DiffHarmony uses the empty prompt).",
                       "The model's VAE, for DiffHarmony Conditioning and VAE Decode.")
    FUNCTION = "load"
    SEARCH_ALIASES = ALIASES + ("loader", "native", "checkpoint loader", "inpainting model", "ksampler")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (sorted(_model_choices()), {"tooltip": "DiffHarmony archive folder, diffusers folder or "
                                                            ".safetensors inpainting checkpoint."}),
            "weight_dtype": ([k for k, v in WEIGHT_DTYPES.items() if k == "default" or v is not None],
                             {"default": "default", "tooltip": "Weight dtype. default: ComfyUI's choice per "
                                                               "component and device; fp32/fp16/bf16: UNet and text "
                                                               "encoder; fp8: the UNet only (half its memory)."}),
        }}

    def load(self, model, weight_dtype):
        path = host.resolve_choice(model, _model_choices(), "model", MODEL_FOLDERS)
        dtype = WEIGHT_DTYPES[weight_dtype]
        text_dtype = dtype if weight_dtype in ("fp32", "fp16", "bf16") else None
        return host.native_sd(path, dtype, text_dtype)


class HarmonizeDiffHarmonyConditioning:
    DESCRIPTION = ("DiffHarmony's conditioning for ComfyUI's KSampler: the VAE latent of the WHOLE, unmasked "
                   "composite as the concat latent, the mask binarised at 0.5 and brought to latent size "
                   "(nearest) as the concat mask, the empty prompt, and an all-zero latent so sampling starts "
                   "from pure noise. Sample with euler_ancestral / normal / 5 steps / cfg 1.0, denoise 1.0. "
                   "Do not use InpaintModelConditioning for DiffHarmony: it greys the masked pixels before "
                   "encoding (the foreground DiffHarmony re-lights is lost) and locks the background with a "
                   "noise mask, which is inpainting, not harmonization.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    OUTPUT_TOOLTIPS = ("Empty prompt + composite latent + latent-size mask.",
                       "The same (cfg 1.0 never evaluates it).",
                       "All zeros at the working size: KSampler starts from pure noise.")
    FUNCTION = "condition"
    SEARCH_ALIASES = ALIASES + ("conditioning", "native", "ksampler", "inpaint conditioning", "concat latent")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The UNet that will sample; checked to be a 9-channel inpainting UNet "
                                           "matching the VAE before anything runs."}),
            "clip": ("CLIP", {"tooltip": "Text encoder, for DiffHarmony's empty prompt."}),
            "vae": ("VAE", {"tooltip": "The model's VAE; encodes the composite."}),
            "composite": ("IMAGE", {"tooltip": "The composite image (foreground pasted on the background)."}),
            "mask": ("MASK", {"tooltip": "Foreground mask (white = the pasted object)."}),
            "resolution": DIFFHARMONY_RESOLUTION, "fit": FIT,
        }}

    def condition(self, model, clip, vae, composite, mask, resolution, fit):
        native.check_fit(*host.model_channels(model), host.vae_latent_channels(vae))
        pixels, latent_mask, _ = native.prepare(composite, mask, resolution, square=fit == FITS[1])
        latent = host.vae_encode(vae, pixels)
        values = {"concat_latent_image": latent, "concat_mask": latent_mask}
        cond = host.encode_prompt(clip, "")
        return (host.set_conditioning(cond, values), host.set_conditioning(cond, values),
                native.empty_latent_like(latent))


NODE_CLASS_MAPPINGS = {c.__name__: c for c in (
    HarmonizeDiffHarmonyLoader, HarmonizeDiffHarmonyEncode, HarmonizeMaskToLatent, HarmonizeDiffHarmonySampler,
    HarmonizeDiffHarmonyDecode, HarmonizeRefinerLoader, HarmonizeRefine, HarmonizeDiffHarmony,
    HarmonizeConditionVAELoader, HarmonizeConditionVAEDecode, HarmonizeInverseLoader, HarmonizeMakeComposite,
    HarmonizeDiffHarmonyNativeLoader, HarmonizeDiffHarmonyConditioning)}
NODE_DISPLAY_NAME_MAPPINGS = {
    "HarmonizeDiffHarmonyLoader": "Harmonize: DiffHarmony Loader",
    "HarmonizeDiffHarmonyEncode": "Harmonize: DiffHarmony Encode",
    "HarmonizeMaskToLatent": "Harmonize: Mask To Latent",
    "HarmonizeDiffHarmonySampler": "Harmonize: DiffHarmony Sampler",
    "HarmonizeDiffHarmonyDecode": "Harmonize: DiffHarmony Decode",
    "HarmonizeRefinerLoader": "Harmonize: Refiner Loader",
    "HarmonizeRefine": "Harmonize: Refine",
    "HarmonizeDiffHarmony": "Harmonize: DiffHarmony (all-in-one)",
    "HarmonizeConditionVAELoader": "Harmonize: DiffHarmony Condition-VAE Loader",
    "HarmonizeConditionVAEDecode": "Harmonize: DiffHarmony Condition-VAE Decode",
    "HarmonizeInverseLoader": "Harmonize: DiffHarmony Inverse Loader",
    "HarmonizeMakeComposite": "Harmonize: DiffHarmony Inverse (Make Composite)",
    "HarmonizeDiffHarmonyNativeLoader": "Harmonize: DiffHarmony Loader (ComfyUI MODEL/CLIP/VAE)",
    "HarmonizeDiffHarmonyConditioning": "Harmonize: DiffHarmony Conditioning",
}
