"""Colour nodes: restore to the input size, full-resolution colour transfer and 3D LUTs (thin adapters over
pipelines/color/restore.py, transfer.py and lut.py)."""
from __future__ import annotations

import os

from . import host
from ..pipelines.color import lut as lut_pipeline
from ..pipelines.color import restore as restore_pipeline
from .widgets import DETAIL, FEATHER, LUT_SIZE
from .widgets import LUT as LUT_TYPE  # pipelines.color.lut.Lut3D: no ComfyUI type holds a 3D LUT

CATEGORY = "harmonize/color"
ALIASES = ("harmonize", "harmonization", "color match", "colour match", "color grading", "composite")
LUT_ALIASES = ALIASES + ("lut", "3d lut", "cube", ".cube", "color lookup table")
_SMOOTH_TIP = ("How strongly colors the foreground does not contain are filled smoothly from the fitted ones "
               "(they tend to the global affine color change far from any data). Larger = smoother LUT, "
               "looser fit.")


def _relative_to_output(path: str) -> str:
    try:
        return os.path.relpath(path, host.output_directory())
    except ValueError:  # another drive on Windows
        return path


class HarmonizeRestore:
    DESCRIPTION = ("Brings a harmonized result back to the composite's own size and pastes it inside the mask; "
                   "outside the mask the composite is kept bit for bit. detail 'transfer' applies the result's "
                   "colour change to the full-resolution composite instead of upscaling it.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The composite at its own size with the harmonized result inside the mask.",)
    SEARCH_ALIASES = ALIASES + ("restore", "paste", "upscale", "paste back", "blend")
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
        return (restore_pipeline.restore(harmonized, composite, mask, feather=feather, detail=detail,
                                         cancel=host.check_interrupt),)


class HarmonizeColorTransfer:
    DESCRIPTION = ("Bring a harmonized result (any working size) back to the composite's full resolution "
                   "WITHOUT its blur: the color change from the composite to the harmonized image is fitted "
                   "as smooth local color transforms at the working resolution and applied to the "
                   "full-resolution composite, so colors and light follow the harmonized image while edges, "
                   "faces and texture are the composite's own. Outside the mask the composite is kept bit "
                   "for bit.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The composite at its own size with the harmonized colors inside the mask.",)
    SEARCH_ALIASES = ALIASES + ("color transfer", "detail transfer", "full resolution", "upscale", "relight")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "composite": ("IMAGE", {"tooltip": "The original composite at full resolution (the output size)."}),
            "harmonized": ("IMAGE", {"tooltip": "The harmonized result at its working resolution (any size "
                                                "or aspect), e.g. from DiffHarmony or the zero-shot node."}),
            "mask": ("MASK", {"tooltip": "Foreground mask at the composite's size (white = harmonized object)."}),
            "feather": FEATHER,
        }}

    def run(self, composite, harmonized, mask, feather=0):
        return (restore_pipeline.restore(harmonized, composite, mask, int(feather), detail="transfer",
                                         cancel=host.check_interrupt),)


class HarmonizeFitLUT:
    DESCRIPTION = ("Fit one global 3D LUT that maps the composite's foreground colors to the harmonized "
                   "result's (lattice regression with a smoothness term, so colors the foreground lacks are "
                   "filled smoothly). Save it as a .cube file for Photoshop, DaVinci Resolve or ffmpeg with "
                   "'Save LUT', or apply it with 'Apply LUT'. The preview is the full-resolution composite "
                   "with the LUT applied inside the mask.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = (LUT_TYPE, "IMAGE")
    RETURN_NAMES = ("lut", "preview")
    OUTPUT_TOOLTIPS = ("The fitted 3D LUT.", "The composite with the LUT applied inside the mask.")
    SEARCH_ALIASES = LUT_ALIASES + ("fit lut",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "composite": ("IMAGE", {"tooltip": "The composite (any size); its foreground colors are the LUT's input."}),
            "harmonized": ("IMAGE", {"tooltip": "The harmonized result (any size; the composite and mask are "
                                                "resized to it); its foreground colors are the LUT's output."}),
            "mask": ("MASK", {"tooltip": "Foreground mask at the composite's size: only these pixels are fitted."}),
            "size": LUT_SIZE,
            "smoothness": ("FLOAT", {"default": lut_pipeline.DEFAULT_SMOOTHNESS, "min": 1e-5, "max": 1.0,
                                     "step": 1e-5, "tooltip": _SMOOTH_TIP}),
        }}

    def run(self, composite, harmonized, mask, size="33", smoothness=lut_pipeline.DEFAULT_SMOOTHNESS):
        lut = lut_pipeline.fit_lut(composite, harmonized, mask, int(size), float(smoothness),
                                   cancel=host.check_interrupt)
        return (lut, lut_pipeline.apply_lut(composite, lut, mask, cancel=host.check_interrupt))


class HarmonizeApplyLUT:
    DESCRIPTION = ("Apply a 3D LUT (trilinear interpolation) to an image of any size; with a mask, only inside "
                   "the mask (the rest stays bit for bit).")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The image with the LUT applied.",)
    SEARCH_ALIASES = LUT_ALIASES + ("apply lut",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "Image to recolor (any size and batch)."}),
            "lut": (LUT_TYPE, {"tooltip": "A LUT from 'Fit LUT'."}),
            "feather": FEATHER,
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Optional: apply only inside this mask (white)."}),
        }}

    def run(self, image, lut, feather=0, mask=None):
        return (lut_pipeline.apply_lut(image, lut, mask, int(feather), cancel=host.check_interrupt),)


class HarmonizeSaveLUT:
    DESCRIPTION = ("Write a 3D LUT as a .cube file (Adobe/Resolve Cube LUT format: Photoshop, DaVinci Resolve, "
                   "Premiere, ffmpeg lut3d) into ComfyUI's output folder. An existing file is never "
                   "overwritten: a numbered name is used instead. The file name is shown on the node.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("file",)
    OUTPUT_TOOLTIPS = ("The written file, relative to the output folder.",)
    SEARCH_ALIASES = LUT_ALIASES + ("save lut", "export lut")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lut": (LUT_TYPE, {"tooltip": "The LUT to save (from 'Fit LUT')."}),
            "filename_prefix": ("STRING", {"default": "harmonize/lut",
                                           "tooltip": "File name (without .cube) inside the output folder; "
                                                      "may contain sub-folders."}),
        }}

    def run(self, lut, filename_prefix="harmonize/lut"):
        path = lut_pipeline.write_cube(lut, lut_pipeline.cube_path(host.output_directory(), filename_prefix))
        name = _relative_to_output(path)
        return {"ui": {"text": [name]}, "result": (name,)}


class HarmonizeLUTSequence:
    DESCRIPTION = ("Turn the per-iteration results of an iterative harmonizer (a batch, in order) into one "
                   ".cube LUT per consecutive pair (iteration k -> k+1), written into ComfyUI's output folder "
                   "(never overwriting), so an editor can replay or tweak each step.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("files",)
    OUTPUT_TOOLTIPS = ("The written files, one per line, relative to the output folder.",)
    SEARCH_ALIASES = LUT_ALIASES + ("lut sequence", "iterations", "export lut")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "Per-iteration images as one batch, in iteration order (at least 2)."}),
            "mask": ("MASK", {"tooltip": "Foreground mask: one for all images, or one per image."}),
            "size": LUT_SIZE,
            "filename_prefix": ("STRING", {"default": "harmonize/steps",
                                           "tooltip": "Name prefix inside the output folder; files are "
                                                      "<prefix>_000-001.cube, <prefix>_001-002.cube, ..."}),
        }}

    def run(self, images, mask, size="33", filename_prefix="harmonize/steps"):
        paths = lut_pipeline.save_lut_sequence(images, mask, host.output_directory(), filename_prefix, int(size),
                                               cancel=host.check_interrupt)
        names = [_relative_to_output(p) for p in paths]
        return {"ui": {"text": names}, "result": ("\n".join(names),)}


NODE_CLASS_MAPPINGS = {
    "HarmonizeRestore": HarmonizeRestore,
    "HarmonizeColorTransfer": HarmonizeColorTransfer,
    "HarmonizeFitLUT": HarmonizeFitLUT,
    "HarmonizeApplyLUT": HarmonizeApplyLUT,
    "HarmonizeSaveLUT": HarmonizeSaveLUT,
    "HarmonizeLUTSequence": HarmonizeLUTSequence,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "HarmonizeRestore": "Harmonize: Restore To Input Size",
    "HarmonizeColorTransfer": "Harmonize: Color Transfer (full resolution)",
    "HarmonizeFitLUT": "Harmonize: Fit 3D LUT",
    "HarmonizeApplyLUT": "Harmonize: Apply 3D LUT",
    "HarmonizeSaveLUT": "Harmonize: Save LUT (.cube)",
    "HarmonizeLUTSequence": "Harmonize: LUT Sequence (.cube per iteration)",
}
