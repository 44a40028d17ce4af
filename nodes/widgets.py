"""Widget specs and custom type names shared by the node modules: one spec, one default per concept.

A node that has a `seed`, `feather`, `detail`, `dtype`, ... input uses the spec defined here, so the same
concept looks and behaves the same on every node (tests/nodes/test_node_contract.py checks it). A concept
whose meaning differs between the two systems (the working `resolution`, the sampling `steps`, the
`guidance`) has one spec per system, each named after it; `CONCEPTS` lists, per input name, the specs an
input of that name may use.
"""
from __future__ import annotations

from ..pipelines.color import lut
from ..pipelines.color.restore import DETAIL_MODES
from ..pipelines.diffharmony import pipeline as dh
from ..pipelines.zero_shot import passes as zs
from . import host

# Custom types: only where no ComfyUI type fits, always with the pack's prefix so that no other pack's type
# of the same name can be connected by mistake.
DIFFHARMONY_MODEL = "HARMONIZE_DIFFHARMONY_MODEL"  # pipelines.sd.loading.SDComponents (9-channel inpainting UNet)
REFINER = "HARMONIZE_REFINER"                      # DiffHarmony's refinement UNet
CONDITION_VAE = "HARMONIZE_CONDITION_VAE"          # pipelines.diffharmony.condition_vae.ConditionVAE
T2I_MODEL = "HARMONIZE_T2I_MODEL"                  # pipelines.zero_shot.model.ZeroShotModel
ZS_SETTINGS = "HARMONIZE_ZS_SETTINGS"              # pipelines.zero_shot.passes.ZeroShotSettings
INVERSION = "HARMONIZE_INVERSION"                  # pipelines.zero_shot.passes.InversionBatch
ZS_EMBEDDINGS = "HARMONIZE_ZS_EMBEDDINGS"          # refined embeddings per composite
DESCRIPTIONS = "HARMONIZE_DESCRIPTIONS"            # pipelines.describe.descriptions.DescriptionSet
EVALUATOR = "HARMONIZE_EVALUATOR"                  # callable score(images, masks) -> [B]
LUT = "HARMONIZE_LUT"                              # pipelines.color.lut.Lut3D
PIDINET = "HARMONIZE_PIDINET"                      # pipelines.edges.pidinet.PiDiNet
CUSTOM_TYPES = (DIFFHARMONY_MODEL, REFINER, CONDITION_VAE, T2I_MODEL, ZS_SETTINGS, INVERSION, ZS_EMBEDDINGS, DESCRIPTIONS,
                EVALUATOR, LUT, PIDINET)

MAX_SEED = 0xFFFFFFFFFFFFFFFF
FITS = ("keep aspect", "square (official)")
PAPER = zs.PRESETS["paper"]

# --- one spec per concept, on every node ------------------------------------------------------------------
SEED = ("INT", {"default": 0, "min": 0, "max": MAX_SEED,
                "tooltip": "Seed of the random numbers: the same seed and inputs give the same result."})
FEATHER = ("INT", {"default": 0, "min": 0, "max": 256, "step": 1,
                   "tooltip": "Soften the mask edge inwards by this many pixels when pasting; the background "
                              "stays untouched."})
DETAIL = (list(DETAIL_MODES), {"default": "resample",
                               "tooltip": "resample: upscale the working-size result into the composite. "
                                          "transfer: apply its colour change to the full-resolution composite, "
                                          "keeping the composite's own detail."})
DTYPE = (list(host.DTYPES), {"default": "auto",
                             "tooltip": "Precision of the weights: auto = fp16 (bf16 where ComfyUI prefers it) on "
                                        "CUDA, fp32 on the CPU."})
FIT = (list(FITS), {"default": FITS[0],
                    "tooltip": "keep aspect: long side = resolution, aspect ratio kept. square (official): resize "
                               "to resolution x resolution as the official code does."})

# --- DiffHarmony --------------------------------------------------------------------------------------------
DIFFHARMONY_RESOLUTION = ("INT", {"default": dh.DEFAULT_RESOLUTION, "min": 256, "max": 4096, "step": 64,
                                  "tooltip": "Working resolution (long side) of the diffusion stage. The paper's "
                                             "best results are at 1024."})
REFINE_RESOLUTION = ("INT", {"default": 256, "min": 64, "max": 4096, "step": 16,
                             "tooltip": "Refinement resolution (long side, multiple of 16; paper: 256)."})
DIFFHARMONY_STEPS = ("INT", {"default": dh.DEFAULT_STEPS, "min": 1, "max": 200,
                             "tooltip": "Sampling steps (paper: 5)."})
SCHEDULER = (list(dh.SCHEDULERS), {"default": "euler_ancestral", "tooltip": "Sampler (paper: Euler ancestral)."})
DIFFHARMONY_GUIDANCE = ("FLOAT", {"default": 1.0, "min": 1.0, "max": 20.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance (paper: 1.0 = off). Only has an effect "
                                             "when the prompt is not empty."})
DECODERS = ("vae", "condition vae")
DECODER = (list(DECODERS), {"default": "vae",
                            "tooltip": "vae: the model's VAE decodes the latent (blurs what the 8x latent cannot "
                                       "hold). condition vae: the archive's condition_vae/ decodes it while also "
                                       "seeing the composite, keeping its fine detail (the authors' "
                                       "DiffHarmony++); found beside base/ unless one is connected."})
PREPROCESSING = ("pack", "official")
PREPROCESS = (list(PREPROCESSING), {
    "default": "pack",
    "tooltip": "pack: the composite at its own aspect ratio, the result pasted back at its size (fit, feather and "
               "detail apply). official: exactly what the authors' loader and script feed and return, to "
               "reproduce the paper's numbers: the composite as an 8-bit image resized by PIL to a resolution x "
               "resolution square, the mask dithered to 1 bit, the result the square at refine_resolution "
               "(with a refiner, paper: 256) or at resolution, with no paste-back; fit, feather and detail do "
               "not apply."})

# --- zero-shot ----------------------------------------------------------------------------------------------
ZERO_SHOT_RESOLUTION = ("INT", {"default": PAPER.resolution, "min": 64, "max": 4096, "step": 64,
                                "tooltip": "Long side of the working size; the aspect ratio is kept and the result "
                                           "is pasted back at the composite's own size (paper: 512, square)."})
ZERO_SHOT_STEPS = ("INT", {"default": PAPER.steps, "min": 1, "max": 1000, "tooltip": "DDIM steps (paper: 50)."})
ZERO_SHOT_GUIDANCE = ("FLOAT", {"default": PAPER.guidance, "min": 0.0, "max": 30.0, "step": 0.1,
                                "tooltip": "Classifier-free guidance of the edit (paper: 2.5)."})
PRESET = (list(zs.PRESETS), {"default": "paper",
                             "tooltip": "paper: the paper's settings (50 DDIM steps, guidance 2.5, 10 iterations, "
                                        "refinement lr 1e-3 x2 per step with w 5000, null-text lr 0.1 with "
                                        "step//10+1 iterations, edge loss). fast: 20 steps, one optimiser step "
                                        "per timestep, 3 iterations. draft: 10 steps, one iteration, no edge "
                                        "loss. Ignored when a settings input is connected."})
PAINTERLY = ("BOOLEAN", {"default": False,
                         "tooltip": "For paintings and artwork (the authors' advice): no edge loss, and no "
                                    "self-attention injection in the first 30% of the steps, so the style can "
                                    "change more."})
EDGE_RESOLUTION = ("INT", {"default": PAPER.resolution, "min": 0, "max": 4096, "step": 8,
                           "tooltip": "Long side of the working size the maps are computed at (the zero-shot "
                                      "default is 512); 0 keeps the image's own size."})

# --- 3D LUTs ------------------------------------------------------------------------------------------------
LUT_SIZE = ([str(s) for s in lut.LUT_SIZES], {
    "default": str(lut.DEFAULT_SIZE),
    "tooltip": "Nodes per axis of the 3D LUT: 17 (small, coarse), 33 (the usual editing size) or 65 (finest). "
               "Larger takes longer to fit."})

# Input name -> the specs an input of that name may use (the contract test checks every node against it;
# an input name that occurs on two nodes must be listed here).
CONCEPTS = {
    "seed": (SEED,),
    "feather": (FEATHER,),
    "detail": (DETAIL,),
    "dtype": (DTYPE,),
    "fit": (FIT,),
    "scheduler": (SCHEDULER,),
    "preset": (PRESET,),
    "painterly": (PAINTERLY,),
    "steps": (DIFFHARMONY_STEPS, ZERO_SHOT_STEPS),
    "guidance": (DIFFHARMONY_GUIDANCE, ZERO_SHOT_GUIDANCE),
    "resolution": (DIFFHARMONY_RESOLUTION, REFINE_RESOLUTION, ZERO_SHOT_RESOLUTION, EDGE_RESOLUTION),
    "refine_resolution": (REFINE_RESOLUTION,),
    "decoder": (DECODER,),
    "preprocess": (PREPROCESS,),
}
