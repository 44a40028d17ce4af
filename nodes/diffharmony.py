"""DiffHarmony as ComfyUI nodes: one node per stage, and an all-in-one node."""
from __future__ import annotations

import torch

from ..pipelines.diffharmony import pipeline as dh
from ..pipelines.sd import loading
from ..pipelines.diffharmony import refiner as rf
from ..pipelines.color.restore import DETAIL_MODES, restore
from . import host

CATEGORY = "harmonize/DiffHarmony"
FITS = ("keep aspect", "square (official)")
MODEL_FOLDERS = ("diffharmony", "diffusers", "checkpoints")

SEED = ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                "tooltip": "Random seed; the same seed and inputs give the same result."})
RESOLUTION = ("INT", {"default": dh.DEFAULT_RESOLUTION, "min": 256, "max": 4096, "step": 64,
                      "tooltip": "Working resolution (long side) of the diffusion stage. The paper's best results "
                                 "are at 1024."})
FIT = (list(FITS), {"default": FITS[0], "tooltip": "keep aspect: long side = resolution, aspect ratio kept. "
                                                  "square (official): resize to resolution x resolution as the "
                                                  "official code does."})
FEATHER = ("INT", {"default": 0, "min": 0, "max": 256, "tooltip": "Soften the mask edge inwards by this many "
                                                                 "pixels; the background stays untouched."})
DETAIL = (list(DETAIL_MODES), {"default": "resample", "tooltip": "resample: upscale the harmonized image. "
                                                                 "transfer: apply its color change to the "
                                                                 "full-resolution composite, keeping its detail."})


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
    RETURN_TYPES = ("HARMONY_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (sorted(_model_choices()), {"tooltip": "DiffHarmony archive folder, diffusers folder or "
                                                            ".safetensors inpainting checkpoint."}),
            "dtype": (list(host.DTYPES), {"default": "auto", "tooltip": "auto: fp16/bf16 on CUDA, fp32 on CPU."}),
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
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("HARMONY_MODEL", {"tooltip": "From the DiffHarmony loader."}),
            "composite": ("IMAGE", {"tooltip": "The composite image (foreground pasted on the background)."}),
            "resolution": RESOLUTION, "fit": FIT, "seed": SEED,
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

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("HARMONY_MODEL", {"tooltip": "From the DiffHarmony loader."}),
            "composite_latent": ("LATENT", {"tooltip": "From Harmonize: DiffHarmony Encode."}),
            "latent_mask": ("MASK", {"tooltip": "From Harmonize: Mask To Latent."}),
            "seed": SEED,
            "steps": ("INT", {"default": dh.DEFAULT_STEPS, "min": 1, "max": 200, "tooltip": "Sampling steps "
                                                                                           "(paper: 5)."}),
            "scheduler": (list(dh.SCHEDULERS), {"default": "euler_ancestral", "tooltip": "Sampler (paper: "
                                                                                          "Euler ancestral)."}),
            "guidance": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 20.0, "step": 0.1,
                                   "tooltip": "Classifier-free guidance (paper: 1.0 = off). Only has an effect "
                                              "when the prompt is not empty."}),
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

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("HARMONY_MODEL", {"tooltip": "From the DiffHarmony loader."}),
            "latent": ("LATENT", {"tooltip": "From Harmonize: DiffHarmony Sampler."}),
        }}

    def decode(self, model, latent):
        return (dh.decode(_on_device(model), latent["samples"], cancel=host.check_interrupt),)


class HarmonizeRefinerLoader:
    DESCRIPTION = "Loads DiffHarmony's refinement UNet (the archive's refinement/ folder) from models/diffharmony."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("HARMONY_REFINER",)
    RETURN_NAMES = ("refiner",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "refiner": (sorted(_refiner_choices()), {"tooltip": "A refinement/ folder (config.json + "
                                                                "diffusion_pytorch_model.safetensors)."}),
            "dtype": (list(host.DTYPES), {"default": "auto", "tooltip": "auto: fp16/bf16 on CUDA, fp32 on CPU."}),
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
    FUNCTION = "refine"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "refiner": ("HARMONY_REFINER", {"tooltip": "From Harmonize: Refiner Loader."}),
            "harmonized": ("IMAGE", {"tooltip": "The decoded DiffHarmony result."}),
            "composite": ("IMAGE", {"tooltip": "The original composite."}),
            "mask": ("MASK", {"tooltip": "Foreground mask."}),
            "resolution": ("INT", {"default": 256, "min": 64, "max": 4096, "step": 16,
                                   "tooltip": "Refinement resolution (long side, multiple of 16; paper: 256)."}),
            "fit": FIT,
        }}

    def refine(self, refiner, harmonized, composite, mask, resolution, fit):
        device = host.load_to_device(refiner)
        return (rf.refine(refiner, harmonized, composite, mask, resolution, device=device, square=fit == FITS[1],
                          cancel=host.check_interrupt),)


class HarmonizeRestore:
    DESCRIPTION = ("Brings a harmonized result back to the composite's own size and pastes it inside the mask; "
                   "outside the mask the composite is kept bit for bit.")
    CATEGORY = "harmonize"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "restore"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "harmonized": ("IMAGE", {"tooltip": "Harmonized image at any size (working or refinement size)."}),
            "composite": ("IMAGE", {"tooltip": "The original composite, at the size of the output."}),
            "mask": ("MASK", {"tooltip": "Foreground mask."}),
            "feather": FEATHER, "detail": DETAIL,
        }}

    def restore(self, harmonized, composite, mask, feather, detail):
        return (restore(harmonized, composite, mask, feather=feather, detail=detail, cancel=host.check_interrupt),)


class HarmonizeDiffHarmony:
    DESCRIPTION = ("DiffHarmony in one node: encode, sample, decode, optional refinement, and paste back at the "
                   "composite's size. Same result as the stage nodes for the same settings.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "harmonize"

    @classmethod
    def INPUT_TYPES(cls):
        stage = HarmonizeDiffHarmonySampler.INPUT_TYPES()["required"]
        return {"required": {
            "model": ("HARMONY_MODEL", {"tooltip": "From the DiffHarmony loader."}),
            "composite": ("IMAGE", {"tooltip": "The composite image."}),
            "mask": ("MASK", {"tooltip": "Foreground mask (white = the pasted object)."}),
            "seed": SEED, "steps": stage["steps"], "scheduler": stage["scheduler"], "guidance": stage["guidance"],
            "resolution": RESOLUTION, "fit": FIT,
            "refine_resolution": HarmonizeRefine.INPUT_TYPES()["required"]["resolution"],
            "feather": FEATHER, "detail": DETAIL,
        }, "optional": {
            "refiner": ("HARMONY_REFINER", {"tooltip": "Optional refinement model (recommended)."}),
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
    HarmonizeDiffHarmonyDecode, HarmonizeRefinerLoader, HarmonizeRefine, HarmonizeRestore, HarmonizeDiffHarmony)}
NODE_DISPLAY_NAME_MAPPINGS = {
    "HarmonizeDiffHarmonyLoader": "Harmonize: DiffHarmony Loader",
    "HarmonizeDiffHarmonyEncode": "Harmonize: DiffHarmony Encode",
    "HarmonizeMaskToLatent": "Harmonize: Mask To Latent",
    "HarmonizeDiffHarmonySampler": "Harmonize: DiffHarmony Sampler",
    "HarmonizeDiffHarmonyDecode": "Harmonize: DiffHarmony Decode",
    "HarmonizeRefinerLoader": "Harmonize: Refiner Loader",
    "HarmonizeRefine": "Harmonize: Refine",
    "HarmonizeRestore": "Harmonize: Restore To Input Size",
    "HarmonizeDiffHarmony": "Harmonize: DiffHarmony (all-in-one)",
}
