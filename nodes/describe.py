"""Description sources for zero-shot harmonization: typed by hand, or written by a vision-language model."""
from __future__ import annotations

from ..pipelines.describe import descriptions as ds
from ..pipelines.describe import vlm
from . import host
from .widgets import DESCRIPTIONS, SEED

CATEGORY = "harmonize/zero-shot"
ALIASES = ("harmonize", "harmonization", "zero-shot", "describe", "description", "prompt", "caption")
NO_LOCAL_MODEL = "none"
LLM_FOLDER = "LLM"

OUT_TIPS = ("Candidate descriptions for the zero-shot harmonization nodes.",)


def _local_choices() -> list[str]:
    return [NO_LOCAL_MODEL, *vlm.local_models(host.model_roots(LLM_FOLDER))]


class HarmonizeDescription:
    DESCRIPTION = ("Describes the composite's imaging conditions by hand: the object, words for the foreground's "
                   "conditions and words for the background's (the prompts put the object first: 'dog bright "
                   "summer' -> 'dog winter dull'). Or write one or more lines in the paper's format "
                   "'OBJECT & (foreground) W W & (background) W W' in the text box; each line is a candidate. "
                   "Words outside the paper's vocabulary are left out unless vocabulary_only is off.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (DESCRIPTIONS, "STRING")
    RETURN_NAMES = ("descriptions", "text")
    OUTPUT_TOOLTIPS = OUT_TIPS + ("The candidates in the paper's one-line format, and the words left out (for "
                                  "display).",)
    SEARCH_ALIASES = ALIASES + ("text", "manual", "conditions", "vocabulary")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "object": ("STRING", {"default": "dog", "tooltip": "Name of the pasted object, a short noun "
                                                                "('dog', 'teddy bear'). Ignored when text is set."}),
            "foreground": ("STRING", {"default": "bright summer", "tooltip": "Words for the pasted object's "
                                      "imaging conditions as it is now. Ignored when text is set."}),
            "background": ("STRING", {"default": "winter dull greyscale", "tooltip": "Words for the background's "
                                      "imaging conditions, the look to give the object. Ignored when text is set."}),
            "text": ("STRING", {"default": "", "multiline": True, "tooltip": "Optional: one candidate per line "
                                "in the form 'OBJECT & (foreground) W W & (background) W W'. When not blank it "
                                "replaces the three fields above."}),
            "vocabulary_only": ("BOOLEAN", {"default": True, "tooltip": "Keep only words of the paper's vocabulary "
                                            "(brightness, weather, temperature, season, time, colour tone, "
                                            "environment); off: keep every word."}),
        }}

    def build(self, object, foreground, background, text, vocabulary_only):  # noqa: A002 - widget name
        result = ds.description_set(text, object, foreground, background, vocabulary_only)
        shown = result.lines()
        if result.dropped:
            shown += "\n# left out (not in the vocabulary): " + ", ".join(result.dropped)
        return {"ui": {"text": [shown]}, "result": (result, shown)}


class HarmonizeDescribe:
    DESCRIPTION = ("A vision-language model looks at the composite and the mask and writes K candidate "
                   "descriptions (object, foreground conditions, background conditions) in the paper's format, "
                   "with words from its vocabulary. Backends: ollama (a local Ollama server), transformers (a "
                   "model folder in models/LLM), gemini (Google's API; key from the GEMINI_API_KEY environment "
                   "variable), manual (the manual_text box). Answers that cannot be read are asked again; the "
                   "iterative harmonizer can ask the model again for a new description. Describes the first "
                   "composite of a batch. The seed makes answers repeatable with backends that honour seeds; each "
                   "new request uses the next seed.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (DESCRIPTIONS, "STRING")
    RETURN_NAMES = ("descriptions", "raw_answer")
    OUTPUT_TOOLTIPS = OUT_TIPS + ("The model's answer(s) as written.",)
    SEARCH_ALIASES = ALIASES + ("vlm", "vision language model", "llm", "ollama", "gemini", "qwen", "llava")
    FUNCTION = "describe"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The composite (object pasted on the background)."}),
                "mask": ("MASK", {"tooltip": "Mask of the pasted object (white = object)."}),
                "backend": (list(vlm.BACKENDS), {"default": vlm.BACKENDS[0], "tooltip": "ollama: an Ollama server; "
                            "transformers: local_model from models/LLM; gemini: Google Gemini (needs google-genai and "
                            "the GEMINI_API_KEY environment variable); manual: parse manual_text."}),
                "local_model": (_local_choices(), {"tooltip": "Vision-language model folder in models/LLM, for the "
                                "transformers backend (any model transformers' image-text-to-text classes load)."}),
                "model_name": ("STRING", {"default": "", "tooltip": f"Model name for ollama (empty: "
                               f"{vlm.OLLAMA_MODEL}) or gemini (empty: {vlm.GEMINI_MODEL})."}),
                "url": ("STRING", {"default": "", "tooltip": f"Server URL: the Ollama server (empty: {vlm.OLLAMA_URL}) "
                        f"or a Gemini endpoint override (empty: Google's). Never put keys here."}),
                "k": ("INT", {"default": vlm.DEFAULT_K, "min": 1, "max": 16, "tooltip": "Number of different "
                      "candidate descriptions (the paper uses 3; the harmonizer keeps the best). manual: every line counts."}),
                "temperature": ("FLOAT", {"default": vlm.DEFAULT_TEMPERATURE, "min": 0.0, "max": 2.0, "step": 0.05,
                                "tooltip": "Sampling temperature of the model (the paper: 0.3); 0 = greedy."}),
                "seed": SEED,
                "retries": ("INT", {"default": vlm.DEFAULT_RETRIES, "min": 0, "max": 20, "tooltip": "How many times "
                            "to ask again when an answer cannot be read or gives fewer than k descriptions."}),
                "mask_as": (list(vlm.MASK_MODES), {"default": "auto", "tooltip": "How the model sees the mask: "
                            "overlay (object outlined on the composite), second image (the mask itself), auto "
                            "(gemini: second image; others: overlay)."}),
                "timeout": ("FLOAT", {"default": vlm.DEFAULT_TIMEOUT, "min": 1.0, "max": 3600.0, "step": 1.0,
                            "tooltip": "Seconds to wait for a server's answer (ollama, gemini)."}),
                "max_tokens": ("INT", {"default": vlm.DEFAULT_MAX_TOKENS, "min": 16, "max": 4096, "tooltip":
                               "Longest answer in tokens (ollama, transformers)."}),
            },
            "optional": {
                "manual_text": ("STRING", {"default": "", "multiline": True, "tooltip": "For the manual backend: "
                                "one description per line, 'OBJECT & (foreground) W W & (background) W W'."}),
            },
        }

    def describe(self, image, mask, backend, local_model, model_name, url, k, temperature, seed, retries, mask_as,
                 timeout, max_tokens, manual_text=""):
        device = host.torch_device()
        source = vlm.make_backend(
            backend, model=model_name, url=url, timeout=timeout, max_tokens=max_tokens,
            local_model="" if local_model == NO_LOCAL_MODEL else local_model, roots=host.model_roots(LLM_FOLDER),
            device=device, dtype=host.default_dtype(device), place=host.load_to_device, text=manual_text,
            cancel=host.check_interrupt)
        result = vlm.describe(source, image, mask, k=k, retries=retries, temperature=temperature, seed=seed,
                              mask_as=mask_as, callback=host.Progress(retries + 1))
        shown = f"{result.lines()}\n\n# the model's answer:\n{result.raw}"
        return {"ui": {"text": [shown]}, "result": (result, result.raw)}


NODE_CLASS_MAPPINGS = {
    "HarmonizeDescription": HarmonizeDescription,
    "HarmonizeDescribe": HarmonizeDescribe,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "HarmonizeDescription": "Harmonize: Description",
    "HarmonizeDescribe": "Harmonize: Describe with a VLM",
}
