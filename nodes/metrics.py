"""Harmonization metrics node: MSE / PSNR / fMSE / bMSE of a result against its ground truth."""
from __future__ import annotations

from ..pipelines.evaluation import metrics


class HarmonizeMetrics:
    DESCRIPTION = (
        "Measures a harmonized image against its ground truth the way the iHarmony4 benchmark does: both are "
        "resized to 256x256 (antialiased bilinear, 8-bit levels), the mask is binarised, and MSE, PSNR "
        "(peak 255), fMSE (inside the mask) and bMSE (outside) are computed per image on the 0-255 scale. "
        "The figures are shown on the node and returned as outputs (batch means).")
    CATEGORY = "harmonize/evaluation"
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


NODE_CLASS_MAPPINGS = {"HarmonizeMetrics": HarmonizeMetrics}
NODE_DISPLAY_NAME_MAPPINGS = {"HarmonizeMetrics": "Harmonize: Metrics (PSNR / MSE / fMSE)"}
