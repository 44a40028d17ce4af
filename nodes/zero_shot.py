"""Zero-shot harmonization (Chen et al.) as ComfyUI nodes: model loader, settings, DDIM inversion,
text-embedding refinement, edge-constrained Prompt-to-Prompt edit and the iterative loop."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..pipelines.sd import models as sd_models
from ..pipelines.zero_shot import passes as zs
from ..pipelines.zero_shot import loop as zl
from ..pipelines.core.errors import InputError
from ..pipelines.zero_shot.model import WorkCounter, ZeroShotModel
from . import host
from .widgets import (DESCRIPTIONS, DETAIL, DTYPE, EVALUATOR, FEATHER, INVERSION, PAINTERLY, PIDINET, PRESET,
                      SEED, T2I_MODEL, ZERO_SHOT_GUIDANCE, ZERO_SHOT_RESOLUTION, ZERO_SHOT_STEPS, ZS_EMBEDDINGS,
                      ZS_SETTINGS)

CATEGORY = "harmonize/zero-shot"
ALIASES = ("harmonize", "harmonization", "zero-shot", "zero shot", "relight", "composite", "blend", "color match",
           "stable diffusion")
MODEL_FOLDERS = ("diffusers", "checkpoints")
# Stable Diffusion 2-base as one published file (stabilityai/stable-diffusion-2-base), the loader's default
SD2_BASE_FILE = "512-base-ema.safetensors"
PAPER = zs.PRESETS["paper"]

MODEL_IN = (T2I_MODEL, {"tooltip": "Text-to-image Stable Diffusion model from 'Harmonize: Load Text-to-Image Model'."})
INVERSION_IN = (INVERSION, {"tooltip": "From 'Harmonize: Zero-shot DDIM Inversion'."})
SETTINGS_IN = (ZS_SETTINGS, {"tooltip": "Optional: every setting, from 'Harmonize: Zero-shot Settings'. "
                                        "Replaces the preset (this node's own widgets still apply)."})
PIDINET_IN = (PIDINET, {"tooltip": "Optional PiDiNet ('Harmonize: Load PiDiNet') for the learned edge term of the "
                                   "edge constraint (weight 0.1); without it only the Sobel term is used."})
WORK_TIP = "Work done: forward/backward passes through the UNet, VAE, text encoder and PiDiNet."


def _model_choices() -> dict:
    return host.sd_model_choices(MODEL_FOLDERS)


def _on_device(model: ZeroShotModel, *extra) -> ZeroShotModel:
    """Hand the networks (one patcher each) and the ``extra`` modules the run also uses (PiDiNet, evaluator)
    to ComfyUI's model management in one load, so none of them evicts another mid-run."""
    model.to(host.load_models(*model.components.modules().values(),
                              *(m for m in extra if isinstance(m, torch.nn.Module))))  # (a score may be a plain callable)
    return model


def _pidinet(pidinet):
    if pidinet is not None:
        host.load_to_device(pidinet)
    return pidinet


def _settings(preset: str, settings=None, **overrides) -> zs.ZeroShotSettings:
    base = settings if settings is not None else zs.settings_for(preset)
    return replace(base, **overrides).validate()


def _work_output(work: WorkCounter, extra: str = "") -> str:
    text = work.report()
    return f"{extra}\n{text}" if extra else text


class HarmonizeZeroShotLoader:
    DESCRIPTION = ("Loads the text-to-image Stable Diffusion model of the zero-shot harmonization: Stable Diffusion "
                   "2-base (the official default) or SD 1.x, from a diffusers folder in models/diffusers or a "
                   "single-file checkpoint in models/checkpoints (configs ship with the pack; the CLIP tokenizer "
                   "comes from the model folder or ComfyUI's own tokenizer files). Nothing is downloaded. Sampling "
                   "uses DDIM built from the model's scheduler config.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (T2I_MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model, for the zero-shot nodes.",)
    SEARCH_ALIASES = ALIASES + ("loader", "text-to-image model", "checkpoint", "sd 2", "sd 1.5")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        choices = sorted(_model_choices())
        default = {"default": SD2_BASE_FILE} if SD2_BASE_FILE in choices else {}
        return {"required": {
            "model": (choices, {**default, "tooltip": "Text-to-image SD 2-base / SD 1.x: a diffusers folder "
                                                      "(models/diffusers) or a .safetensors checkpoint "
                                                      f"(models/checkpoints; SD 2-base is published as {SD2_BASE_FILE})."}),
            "dtype": DTYPE,
        }}

    def load(self, model, dtype):
        path = host.resolve_choice(model, _model_choices(), "model", MODEL_FOLDERS)
        sd = sd_models.load_sd(path, host.dtype_for(dtype), tokenizer_dir=host.comfy_tokenizer_dir())
        return (ZeroShotModel(sd),)


class HarmonizeZeroShotSettings:
    DESCRIPTION = ("Every setting of the zero-shot harmonization, starting from the paper's values. Connect it to "
                   "the inversion, refinement, edit or iterative node to replace their preset.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (ZS_SETTINGS,)
    RETURN_NAMES = ("settings",)
    OUTPUT_TOOLTIPS = ("The settings, for the zero-shot nodes.",)
    SEARCH_ALIASES = ALIASES + ("settings", "options", "parameters")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        p = PAPER
        return {"required": {
            "steps": ZERO_SHOT_STEPS,
            "guidance": ZERO_SHOT_GUIDANCE,
            "iterations": ("INT", {"default": p.iterations, "min": 1, "max": 100,
                                   "tooltip": "Iterations of the loop, the first (all candidates) included "
                                              "(paper: 10)."}),
            "candidates": ("INT", {"default": p.candidates, "min": 1, "max": 16,
                                   "tooltip": "How many descriptions are tried at the first iteration (paper: 3)."}),
            "refine_lr": ("FLOAT", {"default": p.refine_lr, "min": 0.0, "max": 1.0, "step": 0.0001,
                                    "tooltip": "AdamW learning rate of the text-embedding refinement (paper: 1e-3; "
                                               "official code 5e-4)."}),
            "refine_iters": ("INT", {"default": p.refine_iters, "min": 0, "max": 20,
                                     "tooltip": "Refinement optimiser steps per timestep (paper: 2); 0 = off."}),
            "refine_weight": ("FLOAT", {"default": p.refine_weight, "min": 0.0, "max": 1e7, "step": 100.0,
                                        "tooltip": "Regularisation weight w toward the initial embeddings (paper: "
                                                   "5000; official code 1000)."}),
            "refine_on_trajectory": ("BOOLEAN", {"default": p.refine_on_trajectory,
                                                 "tooltip": "Refine on the inversion latents (saves one UNet pass "
                                                            "per step) instead of re-running the unconditional "
                                                            "reverse process (official)."}),
            "nulltext_lr": ("FLOAT", {"default": p.nulltext_lr, "min": 0.0, "max": 10.0, "step": 0.01,
                                      "tooltip": "AdamW learning rate of the null-text optimisation (official: 0.1)."}),
            "nulltext_iters": ("INT", {"default": p.nulltext_iters, "min": 0, "max": 50,
                                       "tooltip": "Null-text optimiser steps per timestep: this + step // growth "
                                                  "(official: 1 + step // 10)."}),
            "nulltext_growth": ("INT", {"default": p.nulltext_growth, "min": 0, "max": 1000,
                                        "tooltip": "One more null-text step every this many timesteps; 0 = constant."}),
            "edge": ("BOOLEAN", {"default": p.edge, "tooltip": "Edge constraint (Sobel + PiDiNet) in the null-text "
                                                               "optimisation."}),
            "edge_gamma": ("FLOAT", {"default": p.edge_gamma, "min": 0.0, "max": 10.0, "step": 0.01,
                                     "tooltip": "Weight of the PiDiNet term (paper: 0.1)."}),
            "cross_steps": ("FLOAT", {"default": p.cross_steps, "min": 0.0, "max": 1.0, "step": 0.05,
                                      "tooltip": "Fraction of the steps (from the start) with cross-attention "
                                                 "injection (official: 1)."}),
            "self_start": ("FLOAT", {"default": p.self_start, "min": 0.0, "max": 1.0, "step": 0.05,
                                     "tooltip": "Self-attention injection from this fraction of the steps..."}),
            "self_end": ("FLOAT", {"default": p.self_end, "min": 0.0, "max": 1.0, "step": 0.05,
                                   "tooltip": "...to this one (official: all steps)."}),
            "self_min_factor": ("INT", {"default": p.self_min_factor, "min": 1, "max": 64,
                                        "tooltip": "Self-attention injection only at layers of 1/factor of the latent "
                                                   "size or coarser: 1 = all (official), 4 = 16x16 and below at 512 "
                                                   "px (original Prompt-to-Prompt). A power of two."}),
            "cross_min_factor": ("INT", {"default": p.cross_min_factor, "min": 1, "max": 64,
                                         "tooltip": "The same for cross-attention injection (1 = all)."}),
        }}

    def build(self, **kw):
        return (zs.settings_for("paper", **kw),)


class HarmonizeZeroShotInvert:
    DESCRIPTION = ("DDIM inversion (guidance 0, as the paper) of the composite at the working size (aspect ratio "
                   "kept), keeping the whole latent trajectory for the refinement and the null-text optimisation.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (INVERSION, "LATENT", "STRING")
    RETURN_NAMES = ("inversion", "noised_latent", "work")
    OUTPUT_TOOLTIPS = ("The inversion (trajectory, working-size composite and mask, full-size composite).",
                       "The most noised latent of the trajectory.", WORK_TIP)
    SEARCH_ALIASES = ALIASES + ("ddim inversion", "invert", "inversion")
    FUNCTION = "invert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": MODEL_IN,
            "image": ("IMAGE", {"tooltip": "The composite (object pasted on the background)."}),
            "mask": ("MASK", {"tooltip": "Mask of the pasted object (white = object)."}),
            "preset": PRESET,
            "resolution": ZERO_SHOT_RESOLUTION,
            "seed": SEED,
        }, "optional": {"settings": SETTINGS_IN}}

    @host.autograd_node  # ComfyUI runs nodes under inference mode; this one optimises
    def invert(self, model, image, mask, preset, resolution, seed, settings=None):
        s = _settings(preset, settings, seed=seed, resolution=resolution)
        m = _on_device(model)
        work = WorkCounter()
        inv = zs.invert_batch(m, image, mask, s, work, callback=host.Progress(s.steps * max(1, image.shape[0])))
        report = _work_output(work)
        return {"ui": {"text": [report]}, "result": (inv, {"samples": inv.latents(m).cpu()}, report)}


class HarmonizeZeroShotRefine:
    DESCRIPTION = ("Text-embedding refinement (paper Eq. 2-4): the foreground-condition words' cross-attention is "
                   "pulled onto the mask and the background-condition words' onto the background, with a "
                   "regularisation toward the initial embeddings; the background words are fused with learned "
                   "weights into the replacement for each foreground word. One set of embeddings per step.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (ZS_EMBEDDINGS, "IMAGE", "STRING")
    RETURN_NAMES = ("embeddings", "attention", "work")
    OUTPUT_TOOLTIPS = ("Refined embeddings per step, for the edit node.",
                       "Attention of the foreground words (left) and of the fused background words (right) after "
                       "refinement.", WORK_TIP)
    SEARCH_ALIASES = ALIASES + ("text embeddings", "embedding refinement", "cross attention")
    FUNCTION = "refine"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": MODEL_IN,
            "inversion": INVERSION_IN,
            "descriptions": (DESCRIPTIONS, {"tooltip": "From 'Harmonize: Description' or 'Harmonize: "
                                                                 "Describe with a VLM'."}),
            "candidate": ("INT", {"default": 0, "min": 0, "max": 15, "tooltip": "Which description (0 = the "
                                                                               "first) to use."}),
            "preset": PRESET,
        }, "optional": {"settings": SETTINGS_IN}}

    @host.autograd_node  # ComfyUI runs nodes under inference mode; this one optimises
    def refine(self, model, inversion, descriptions, candidate, preset, settings=None):
        cands = descriptions.candidates
        if not 0 <= candidate < len(cands):
            raise InputError(f"candidate {candidate} does not exist: the descriptions have {len(cands)} "
                             f"candidate(s), numbered from 0")
        s = _settings(preset, settings)
        m = _on_device(model)
        work = WorkCounter()
        steps = inversion.items[0].steps if inversion.items else 0
        refined = zs.refine_batch(m, inversion, cands[candidate], s, work,
                                  callback=host.Progress(steps * len(inversion.items)))
        report = _work_output(work, f"description: {cands[candidate].line()}")
        return {"ui": {"text": [report]}, "result": (refined, zs.attention_preview(refined, inversion), report)}


class HarmonizeZeroShotEdit:
    DESCRIPTION = ("The harmonizing edit: null-text optimisation with the edge constraint (Sobel + PiDiNet edges "
                   "of the decoded image kept close to the ORIGINAL composite's inside the mask), then "
                   "Prompt-to-Prompt editing with the refined embeddings, the source branch's cross- and "
                   "self-attention injected into the edited branch. The result is pasted into the composite at "
                   "its own size; the background is untouched.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("harmonized", "work")
    OUTPUT_TOOLTIPS = ("The harmonized composite at the input's size.", WORK_TIP)
    SEARCH_ALIASES = ALIASES + ("prompt-to-prompt", "p2p", "null-text", "edit", "edge constraint")
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": MODEL_IN,
            "inversion": INVERSION_IN,
            "embeddings": (ZS_EMBEDDINGS, {"tooltip": "From 'Harmonize: Zero-shot Refine Embeddings' (made from "
                                                        "the same inversion)."}),
            "preset": PRESET,
            "painterly": PAINTERLY,
            "feather": FEATHER,
            "detail": DETAIL,
        }, "optional": {"pidinet": PIDINET_IN, "settings": SETTINGS_IN}}

    @host.autograd_node  # ComfyUI runs nodes under inference mode; this one optimises
    def edit(self, model, inversion, embeddings, preset, painterly, feather, detail, pidinet=None, settings=None):
        s = _settings(preset, settings, painterly=painterly)
        m = _on_device(model, pidinet)
        work = WorkCounter()
        steps = inversion.items[0].steps if inversion.items else 0
        out, _ = zs.edit_batch(m, inversion, embeddings, s, _pidinet(pidinet), feather, detail, work,
                               callback=host.Progress(2 * steps * len(inversion.items)), cancel=host.check_interrupt)
        report = _work_output(work)
        return {"ui": {"text": [report]}, "result": (out, report)}


class HarmonizeZeroShotIterative:
    DESCRIPTION = ("The whole zero-shot system: each of the K candidate descriptions harmonizes the composite, the "
                   "best-scoring result is kept, then the result is harmonized again and again; when the score "
                   "falls twice in a row the loop goes back and asks for a new description (a VLM description "
                   "node is asked again), and it stops when that does not help or after the set iterations. "
                   "Returns the best result, every result in order, and the scores. Without an evaluator input the "
                   "training-free Lab-statistics score is used.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING", "FLOAT", "STRING")
    RETURN_NAMES = ("harmonized", "iterations", "scores", "score_list", "work")
    OUTPUT_IS_LIST = (False, False, False, True, False)
    OUTPUT_TOOLTIPS = ("The best-scoring result at the input's size.",
                       "Every evaluated result in order (the K candidates first), as a batch.",
                       "What happened: score and decision per result.",
                       "The scores in the order of the results.", WORK_TIP)
    SEARCH_ALIASES = ALIASES + ("iterative", "loop", "evaluator", "all-in-one")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": MODEL_IN,
            "image": ("IMAGE", {"tooltip": "The composite (object pasted on the background)."}),
            "mask": ("MASK", {"tooltip": "Mask of the pasted object (white = object)."}),
            "descriptions": (DESCRIPTIONS, {"tooltip": "Candidate descriptions (K), from 'Harmonize: "
                                                                 "Description' or 'Harmonize: Describe with a VLM'."}),
            "preset": PRESET,
            "painterly": PAINTERLY,
            "resolution": ZERO_SHOT_RESOLUTION,
            "seed": SEED,
            "feather": FEATHER,
            "detail": DETAIL,
        }, "optional": {
            "pidinet": PIDINET_IN,
            "evaluator": (EVALUATOR, {"tooltip": "Optional harmony evaluator (the trained ResNet-50 from "
                                                           "'Harmonize: Load Harmony Evaluator'); default: the "
                                                           "training-free Lab-statistics score."}),
            "settings": SETTINGS_IN,
        }}

    @host.autograd_node  # ComfyUI runs nodes under inference mode; this one optimises
    def run(self, model, image, mask, descriptions, preset, painterly, resolution, seed, feather, detail, pidinet=None,
            evaluator=None, settings=None):
        s = _settings(preset, settings, painterly=painterly, resolution=resolution, seed=seed)
        m = _on_device(model, pidinet, evaluator)
        work = WorkCounter()
        n = image.shape[0] if image.dim() == 4 else 1
        total = zl.progress_total(s, len(descriptions.candidates)) * n
        best, every, log, scores, _ = zl.iterative_batch(m, image, mask, descriptions, s, evaluator,
                                                         _pidinet(pidinet), feather, detail, work,
                                                         callback=host.Progress(total), cancel=host.check_interrupt)
        report = _work_output(work)
        return {"ui": {"text": [log + "\n\n" + report]}, "result": (best, every, log, scores, report)}


NODE_CLASS_MAPPINGS = {
    "HarmonizeZeroShotLoader": HarmonizeZeroShotLoader,
    "HarmonizeZeroShotSettings": HarmonizeZeroShotSettings,
    "HarmonizeZeroShotInvert": HarmonizeZeroShotInvert,
    "HarmonizeZeroShotRefine": HarmonizeZeroShotRefine,
    "HarmonizeZeroShotEdit": HarmonizeZeroShotEdit,
    "HarmonizeZeroShotIterative": HarmonizeZeroShotIterative,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "HarmonizeZeroShotLoader": "Harmonize: Load Text-to-Image Model",
    "HarmonizeZeroShotSettings": "Harmonize: Zero-shot Settings",
    "HarmonizeZeroShotInvert": "Harmonize: Zero-shot DDIM Inversion",
    "HarmonizeZeroShotRefine": "Harmonize: Zero-shot Refine Embeddings",
    "HarmonizeZeroShotEdit": "Harmonize: Zero-shot Edit",
    "HarmonizeZeroShotIterative": "Harmonize: Zero-shot Iterative Harmonize",
}
