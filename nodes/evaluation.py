"""Harmony evaluator nodes: load the ResNet-50 classifier of the zero-shot method and score images."""
from __future__ import annotations


from ..pipelines.evaluation import evaluator as ev
from ..pipelines.core.errors import WeightsError
from . import host

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
    CATEGORY = "harmonize/evaluation"
    FUNCTION = "load"
    RETURN_TYPES = ("HARMONY_EVALUATOR",)
    RETURN_NAMES = ("evaluator",)
    OUTPUT_TOOLTIPS = ("callable scorer: images + masks -> probability of 'harmonious' per image",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "evaluator_name": (sorted(_choices()), {"tooltip": "weights file in models/harmony_evaluator"}),
            "dtype": (list(host.DTYPES), {"default": "fp32", "tooltip": "precision of the classifier; auto = fp16/bf16 "
                                                                 "on CUDA, fp32 on the CPU"}),
        }}

    def load(self, evaluator_name, dtype="fp32"):
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
    CATEGORY = "harmonize/evaluation"
    FUNCTION = "score"
    OUTPUT_NODE = True
    RETURN_TYPES = ("FLOAT", "STRING")
    RETURN_NAMES = ("score", "report")
    OUTPUT_TOOLTIPS = ("mean score over the batch (0..1, higher = more harmonious)", "score of every image")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "evaluator": ("HARMONY_EVALUATOR", {"tooltip": "from the harmony evaluator loader"}),
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


NODE_CLASS_MAPPINGS = {"HarmonizeEvaluatorLoader": HarmonizeEvaluatorLoader,
                       "HarmonizeEvaluatorScore": HarmonizeEvaluatorScore}
NODE_DISPLAY_NAME_MAPPINGS = {"HarmonizeEvaluatorLoader": "Harmonize: Load Harmony Evaluator",
                              "HarmonizeEvaluatorScore": "Harmonize: Harmony Score"}
