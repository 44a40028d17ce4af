"""PiDiNet loader and an edge-map preview: what the zero-shot edge constraint compares."""
from __future__ import annotations

from ..pipelines.edges import loss as edges, pidinet
from ..pipelines.core.errors import InputError
from . import host
from .widgets import EDGE_RESOLUTION, PIDINET

CATEGORY = "harmonize/zero-shot"
ALIASES = ("harmonize", "harmonization", "zero-shot", "edges", "edge detection", "pidinet", "sobel", "lineart")
# PiDiNet as one published file (lllyasviel/Annotators), the loader's default
PIDINET_FILE = "table5_pidinet.pth"


class HarmonizePiDiNetLoader:
    DESCRIPTION = (
        "Loads a PiDiNet edge detector (Su et al. 2021) for the zero-shot harmonization edge constraint, from "
        "ComfyUI's models/pidinet folder. Takes the checkpoints its authors publish (table5_pidinet.pth, "
        "table5_pidinet-small.pth, table5_pidinet-tiny.pth and the -l versions); the variant is read from the "
        "weights. The file is read without executing any code."
    )

    @classmethod
    def INPUT_TYPES(cls):
        names = list(pidinet.find_checkpoints(host.model_roots("pidinet")))
        default = {"default": PIDINET_FILE} if PIDINET_FILE in names else {}
        return {"required": {"pidinet_name": (names, {**default,
            "tooltip": "PiDiNet checkpoint in models/pidinet (e.g. table5_pidinet.pth, table5_pidinet-tiny.pth)."})}}

    RETURN_TYPES = (PIDINET,)
    RETURN_NAMES = ("pidinet",)
    OUTPUT_TOOLTIPS = ("The PiDiNet edge detector, for the zero-shot nodes' edge constraint and the edge-map preview.",)
    SEARCH_ALIASES = ALIASES + ("loader", "edge model")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, pidinet_name):
        path = pidinet.resolve_checkpoint(pidinet_name, host.model_roots("pidinet"))
        return (pidinet.load_pidinet(path),)


class HarmonizeEdgeMap:
    DESCRIPTION = (
        "Shows the edge maps the zero-shot edge constraint keeps in place: the Sobel gradient magnitude per "
        "colour channel, or, with a PiDiNet connected and method 'pidinet', PiDiNet's edge probability. "
        "Computed at the working resolution, where the constraint sees the image."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Image(s) to show the edges of."}),
                "method": (["sobel", "pidinet"], {
                    "tooltip": "sobel: Sobel magnitude per RGB channel. pidinet: PiDiNet edge probability "
                               "(needs the pidinet input)."}),
                "resolution": EDGE_RESOLUTION,
                "normalize": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Scale each map so its brightest edge is white (for viewing; the constraint "
                               "uses the raw values)."}),
            },
            "optional": {
                "pidinet": (PIDINET, {"tooltip": "A PiDiNet from 'Harmonize: Load PiDiNet' (method pidinet)."}),
            },
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("edges",)
    OUTPUT_TOOLTIPS = ("Edge map(s) at the working resolution, values as the constraint sees them.",)
    SEARCH_ALIASES = ALIASES + ("edge map", "edge preview", "edge constraint")
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, image, method, resolution, normalize, pidinet=None):
        if method == "pidinet" and pidinet is None:
            raise InputError("method 'pidinet' needs a PiDiNet: connect 'Harmonize: Load PiDiNet' to the pidinet input")
        model = pidinet if method == "pidinet" else None
        device = host.load_to_device(model) if model is not None else host.torch_device()
        result = edges.edge_preview(image, model, long_side=resolution, normalize=normalize, device=device,
                                    callback=host.Progress(image.shape[0] if image.dim() == 4 else 1))
        return (result,)


NODE_CLASS_MAPPINGS = {
    "HarmonizePiDiNetLoader": HarmonizePiDiNetLoader,
    "HarmonizeEdgeMap": HarmonizeEdgeMap,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "HarmonizePiDiNetLoader": "Harmonize: Load PiDiNet",
    "HarmonizeEdgeMap": "Harmonize: Edge Map",
}
