"""ComfyUI-Harmonize: DiffHarmony and zero-shot image harmonization as ComfyUI nodes."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.host import install_samples, register_model_folders

# The front-end extension (web/js) that shows the text a node reports on the node itself.
WEB_DIRECTORY = "./web"

register_model_folders()
install_samples()  # the sample the shipped workflows load, into ComfyUI's input folder if not there yet

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
