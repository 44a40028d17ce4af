"""Evaluation nodes: the harmony evaluators of the zero-shot loop (the trained ResNet-50 classifier and the
training-free Lab statistics score), scoring images with them, and the benchmark's metrics against a ground
truth."""
from __future__ import annotations

from ..pipelines.core.errors import WeightsError
from ..pipelines.evaluation import evaluator as ev
from ..pipelines.evaluation import metrics
from ..pipelines.evaluation.lab_score import LabStatisticsScore
from . import host
from .widgets import DTYPE, EVALUATOR

CATEGORY = "harmonize/evaluation"
ALIASES = ("harmonize", "harmonization", "evaluate", "evaluation", "score", "quality", "composite")
FOLDER = "harmony_evaluator"


def _choices() -> dict:
    return ev.find_evaluators(host.model_roots(FOLDER))


class HarmonizeEvaluatorLoader:
    DESCRIPTION = (
        "Loads the harmony evaluator of the zero-shot method: a ResNet-50 over RGB + mask that scores how "
        "harmonious a composite looks (probability 0..1). Reads models/harmony_evaluator: a torchvision-layout "
        "state dict with a 4-channel first convolution (.pth/.pt, loaded without unpickling objects) or a "
        ".safetensors written by the pack's training command. The zero-shot loop uses it to pick descriptions "
        "and decide when to stop.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (EVALUATOR,)
    RETURN_NAMES = ("evaluator",)
    OUTPUT_TOOLTIPS = ("callable scorer: images + masks -> probability of 'harmonious' per image",)
    SEARCH_ALIASES = ALIASES + ("harmony evaluator", "resnet", "classifier", "loader")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "evaluator_name": (sorted(_choices()), {"tooltip": "weights file in models/harmony_evaluator"}),
            "dtype": DTYPE,
        }}

    def load(self, evaluator_name, dtype=DTYPE[1]["default"]):
        choices = _choices()
        if evaluator_name not in choices:
            roots = ", ".join(host.model_roots(FOLDER))
            raise WeightsError(f"harmony evaluator {evaluator_name!r} not found in {roots}; found: "
                               f"{', '.join(choices) or 'nothing'}")
        dt = host.dtype_for(dtype)
        model = ev.load_evaluator(choices[evaluator_name], dtype=dt)
        model.to_device = host.load_to_device
        return (model,)


class HarmonizeEvaluatorScore:
    DESCRIPTION = ("Scores images with the harmony evaluator: the probability (0..1) that the region under the "
                   "mask looks harmonious with the rest. Shown on the node and returned per image as text and "
                   "as the batch mean.")
    CATEGORY = CATEGORY
    FUNCTION = "score"
    OUTPUT_NODE = True
    RETURN_TYPES = ("FLOAT", "STRING")
    RETURN_NAMES = ("score", "report")
    OUTPUT_TOOLTIPS = ("mean score over the batch (0..1, higher = more harmonious)", "score of every image")
    SEARCH_ALIASES = ALIASES + ("harmony score", "rate", "judge")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "evaluator": (EVALUATOR, {"tooltip": "from the harmony evaluator loader"}),
            "image": ("IMAGE", {"tooltip": "composites or harmonized results to score"}),
            "mask": ("MASK", {"tooltip": "the foreground mask of each image (one mask for all, or one per image)"}),
        }}

    def score(self, evaluator, image, mask):
        scores = evaluator(image, mask)
        lines = [f"image {i}: {float(s):.4f}" for i, s in enumerate(scores)]
        mean = float(scores.mean())
        if len(lines) > 1:
            lines.append(f"mean: {mean:.4f}")
        report = "\n".join(lines)
        return {"ui": {"text": [report]}, "result": (mean, report)}


class HarmonizeLabHarmonyScore:
    DESCRIPTION = ("A training-free harmony score (0..1, higher = more harmonious) for the zero-shot loop: how well "
                   "the foreground's mean lightness, colour cast (Lab a/b) and lightness contrast match a ring of "
                   "background around it. exp(-d), d = squared mean differences in units of 'scale' Lab units plus "
                   "the squared log contrast ratio. It measures colour/illumination agreement only, not semantics; "
                   "the trained evaluator judges more.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (EVALUATOR,)
    RETURN_NAMES = ("evaluator",)
    OUTPUT_TOOLTIPS = ("Scorer: images + masks -> score per image.",)
    SEARCH_ALIASES = ALIASES + ("lab", "color statistics", "training-free", "harmony score", "color match")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ring": ("FLOAT", {"default": 0.25, "min": 0.01, "max": 4.0, "step": 0.01,
                               "tooltip": "Width of the background ring compared with the object, as a fraction "
                                          "of the square root of the object's area."}),
            "scale": ("FLOAT", {"default": 20.0, "min": 0.1, "max": 200.0, "step": 0.5,
                                "tooltip": "Lab difference that counts as one unit of mismatch."}),
        }}

    def build(self, ring, scale):
        return (LabStatisticsScore(ring=ring, scale=scale),)


class HarmonizeMetrics:
    DESCRIPTION = (
        "Measures a harmonized image against its ground truth the way the iHarmony4 benchmark does: both are "
        "resized to 256x256 (antialiased bilinear, 8-bit levels), the mask is binarised, and MSE, PSNR "
        "(peak 255), fMSE (inside the mask) and bMSE (outside) are computed per image on the 0-255 scale. "
        "The figures are shown on the node and returned as outputs (batch means).")
    CATEGORY = CATEGORY
    FUNCTION = "measure"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "FLOAT", "FLOAT", "FLOAT", "FLOAT")
    RETURN_NAMES = ("report", "psnr", "mse", "fmse", "bmse")
    OUTPUT_TOOLTIPS = (
        "the figures as text, per image and their mean",
        "PSNR in dB (mean over the batch; identical images give the 100 dB cap)",
        "MSE on the 0-255 scale (mean over the batch)",
        "foreground MSE: squared error inside the mask per mask value (mean over the batch)",
        "background MSE: squared error outside the mask per background value (mean over the batch)",
    )
    SEARCH_ALIASES = ALIASES + ("metrics", "psnr", "mse", "fmse", "benchmark", "ground truth", "iharmony4")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "harmonized": ("IMAGE", {"tooltip": "the result to measure"}),
                "ground_truth": ("IMAGE", {"tooltip": "the real image (iHarmony4 real_images/...)"}),
                "mask": ("MASK", {"tooltip": "the foreground mask (binarised at 0.5)"}),
                "size": ("INT", {"default": metrics.DEFAULT_SIZE, "min": 0, "max": 8192, "step": 1,
                                 "tooltip": "side of the square the images are resized to before measuring "
                                            "(256 = the paper's protocol; 0 = the images' own size, which "
                                            "must then be equal)"}),
                "quantize": ("BOOLEAN", {"default": True,
                                         "tooltip": "round to 8-bit levels before and after resizing, as the "
                                                    "official script does when it reads saved image files"}),
            }
        }

    def measure(self, harmonized, ground_truth, mask, size=metrics.DEFAULT_SIZE, quantize=True):
        size = int(size) or None
        values = metrics.image_metrics(harmonized, ground_truth, mask, size=size, quantize=bool(quantize))
        report = metrics.format_report(values, size)
        rows = [{k: float(values[k][i]) for k in (*metrics.METRICS, "fg_ratio")} for i in range(len(values["mse"]))]
        mean = metrics.summarize(rows)["all"]
        result = (report, mean["psnr"], mean["mse"], mean["fmse"], mean["bmse"])
        return {"ui": {"text": [report]}, "result": result}


NODE_CLASS_MAPPINGS = {"HarmonizeEvaluatorLoader": HarmonizeEvaluatorLoader,
                       "HarmonizeEvaluatorScore": HarmonizeEvaluatorScore,
                       "HarmonizeLabHarmonyScore": HarmonizeLabHarmonyScore,
                       "HarmonizeMetrics": HarmonizeMetrics}
NODE_DISPLAY_NAME_MAPPINGS = {"HarmonizeEvaluatorLoader": "Harmonize: Load Harmony Evaluator",
                              "HarmonizeEvaluatorScore": "Harmonize: Harmony Score",
                              "HarmonizeLabHarmonyScore": "Harmonize: Lab Harmony Score (training-free)",
                              "HarmonizeMetrics": "Harmonize: Metrics (PSNR / MSE / fMSE)"}
