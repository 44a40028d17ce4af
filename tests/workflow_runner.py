"""Validate UI-format ComfyUI workflows against node definitions, convert them to API format, and execute
them node by node without ComfyUI.

Built-in ComfyUI nodes that the shipped workflows use (LoadImage, LoadImageMask, SaveImage, PreviewImage)
are stood in for by classes with the same inputs and outputs as ComfyUI's own (comfyui.md reference).
KSampler and VAEDecode are stood in for validation only: they run ComfyUI's own MODEL/VAE objects, so a
workflow using them (``needs_comfyui``) is executed inside ComfyUI by the real-host test.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
SEED_NAMES = ("seed", "noise_seed")
NOTE_TYPES = ("Note", "MarkdownNote")


def _load_rgba(path):
    img = ImageOps.exif_transpose(Image.open(path))
    return img


class LoadImage:
    """ComfyUI's LoadImage: IMAGE from RGB, MASK = 1 - alpha (zeros 64x64 when there is no alpha)."""
    input_dir = "."
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"

    @classmethod
    def INPUT_TYPES(cls):
        files = sorted(os.listdir(cls.input_dir)) if os.path.isdir(cls.input_dir) else []
        return {"required": {"image": (files, {"image_upload": True})}}

    def load_image(self, image):
        img = _load_rgba(os.path.join(self.input_dir, image))
        rgb = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]
        if "A" in img.getbands():
            alpha = torch.from_numpy(np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0)
            mask = 1.0 - alpha
        else:
            mask = torch.zeros((64, 64), dtype=torch.float32)
        return rgb, mask[None]


class LoadImageMask:
    """ComfyUI's LoadImageMask: one channel as MASK (alpha is inverted, as ComfyUI does)."""
    input_dir = "."
    RETURN_TYPES = ("MASK",)
    FUNCTION = "load_image"

    @classmethod
    def INPUT_TYPES(cls):
        files = sorted(os.listdir(cls.input_dir)) if os.path.isdir(cls.input_dir) else []
        return {"required": {"image": (files, {"image_upload": True}),
                             "channel": (["alpha", "red", "green", "blue"],)}}

    def load_image(self, image, channel):
        img = _load_rgba(os.path.join(self.input_dir, image))
        if img.getbands() != ("R", "G", "B", "A"):
            img = img.convert("RGBA")
        c = channel[0].upper()
        mask = torch.from_numpy(np.asarray(img.getchannel(c), dtype=np.float32) / 255.0)
        if c == "A":
            mask = 1.0 - mask
        return (mask[None],)


class SaveImage:
    saved: list = []
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}}

    def save_images(self, images, filename_prefix="ComfyUI"):
        type(self).saved.append((filename_prefix, images))
        return ()


class PreviewImage(SaveImage):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    def save_images(self, images, filename_prefix="preview"):
        return super().save_images(images, filename_prefix)


class NeedsComfyUIObjects(NotImplementedError):
    """A core node that works on ComfyUI's own MODEL/CLIP/VAE objects was asked to run outside ComfyUI."""


class KSampler:
    """ComfyUI's KSampler, for validation: the same inputs and widget layout as ComfyUI's (nodes.py; the
    combo lists are a subset of comfy.samplers' names). It works on ComfyUI's MODEL, which exists only inside
    ComfyUI: workflows using it are validated here and executed by the real-host test
    (tests/test_real_host.py) and in process by tests/native_host_check.py."""
    SAMPLERS = ("euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2m", "dpmpp_sde",
                "ddim", "uni_pc")
    SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal")
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (list(cls.SAMPLERS),), "scheduler": (list(cls.SCHEDULERS),),
            "positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "latent_image": ("LATENT",),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    def sample(self, **_):
        raise NeedsComfyUIObjects("KSampler runs ComfyUI's MODEL: only inside ComfyUI")


class VAEDecode:
    """ComfyUI's VAEDecode, for validation (see KSampler)."""
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}

    def decode(self, **_):
        raise NeedsComfyUIObjects("VAEDecode runs ComfyUI's VAE: only inside ComfyUI")


BUILTINS = {c.__name__: c for c in (LoadImage, LoadImageMask, SaveImage, PreviewImage, KSampler, VAEDecode)}
COMFY_ONLY_TYPES = ("MODEL", "CLIP", "VAE", "CONDITIONING")  # made and used only by ComfyUI's own objects


def needs_comfyui(workflow: dict) -> bool:
    """Whether a workflow passes ComfyUI's own model objects between nodes (then it is executed only inside
    ComfyUI; here it is validated)."""
    return any(link[5] in COMFY_ONLY_TYPES for link in workflow["links"])


class WorkflowError(AssertionError):
    pass


def all_inputs(cls) -> list[tuple[str, tuple, bool]]:
    """(name, spec, required) in declaration order: required first, then optional."""
    types = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            out.append((name, spec, section == "required"))
    return out


def input_type(spec) -> str:
    return "COMBO" if isinstance(spec[0], (list, tuple)) else spec[0]


def is_widget(spec) -> bool:
    opts = spec[1] if len(spec) > 1 else {}
    return input_type(spec) in WIDGET_TYPES + ("COMBO",) and not opts.get("forceInput", False)


def widget_slots(cls) -> list[tuple[str, tuple | None]]:
    """The front end's widgets_values layout: one slot per widget input, plus the extra value the front end
    stores after seed-like INTs (control_after_generate) and after image-upload combos (upload)."""
    slots, upload = [], False
    for name, spec, _ in all_inputs(cls):
        if not is_widget(spec):
            continue
        slots.append((name, spec))
        opts = spec[1] if len(spec) > 1 else {}
        if input_type(spec) == "INT" and (name in SEED_NAMES or opts.get("control_after_generate")):
            slots.append((None, ("CONTROL",)))
        upload = upload or bool(opts.get("image_upload"))
    if upload:  # the upload button is added after the node's own widgets
        slots.append((None, ("UPLOAD",)))
    return slots


def _check_value(where: str, spec, value) -> None:
    kind = input_type(spec)
    opts = spec[1] if len(spec) > 1 else {}
    if kind == "COMBO":
        if value not in spec[0]:
            raise WorkflowError(f"{where}: {value!r} is not one of {list(spec[0])[:10]}")
    elif kind == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            raise WorkflowError(f"{where}: {value!r} is not an INT")
    elif kind == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise WorkflowError(f"{where}: {value!r} is not a FLOAT")
    elif kind == "STRING":
        if not isinstance(value, str):
            raise WorkflowError(f"{where}: {value!r} is not a STRING")
    elif kind == "BOOLEAN":
        if not isinstance(value, bool):
            raise WorkflowError(f"{where}: {value!r} is not a BOOLEAN")
    if kind in ("INT", "FLOAT"):
        if "min" in opts and value < opts["min"] or "max" in opts and value > opts["max"]:
            raise WorkflowError(f"{where}: {value} is outside [{opts.get('min')}, {opts.get('max')}]")


def validate(workflow: dict, mappings: dict, check_files: bool = True) -> None:
    """Raise WorkflowError unless every node type exists, every link joins matching types, every required
    input is linked or a widget, and widget values fit the node definitions. ``check_files=False`` skips
    the values of combos that list files on disk (loaders, LoadImage), which depend on the machine."""
    classes = {**BUILTINS, **mappings}
    for key in ("last_node_id", "last_link_id", "nodes", "links", "version"):
        if key not in workflow:
            raise WorkflowError(f"workflow lacks top-level {key!r}")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {l[0]: l for l in workflow["links"]}
    if max(nodes, default=0) > workflow["last_node_id"] or max(links, default=0) > workflow["last_link_id"]:
        raise WorkflowError("last_node_id / last_link_id smaller than an id in use")
    for node in workflow["nodes"]:
        ntype = node["type"]
        if ntype in NOTE_TYPES:
            continue
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "properties"):
            if key not in node:
                raise WorkflowError(f"node {node.get('id')} lacks {key!r}")
        if ntype not in classes:
            raise WorkflowError(f"node {node['id']}: unknown node type {ntype!r}")
        if node["mode"] != 0:
            raise WorkflowError(f"node {node['id']} ({ntype}) is muted or bypassed")
        cls = classes[ntype]
        declared = {name: (spec, req) for name, spec, req in all_inputs(cls)}
        linked = {}
        for inp in node.get("inputs", []):
            name = inp["name"]
            if name not in declared:
                raise WorkflowError(f"node {node['id']} ({ntype}): input {name!r} is not declared by the node")
            if inp.get("link") is not None:
                link = links.get(inp["link"])
                if link is None:
                    raise WorkflowError(f"node {node['id']} ({ntype}): input {name!r} uses missing link {inp['link']}")
                _, src, src_slot, dst, dst_slot, ltype = link
                if dst != node["id"] or node["inputs"][dst_slot]["name"] != name:
                    raise WorkflowError(f"link {link[0]} does not end at node {node['id']} input {name!r}")
                src_cls = classes[nodes[src]["type"]]
                out_type = src_cls.RETURN_TYPES[src_slot]
                want = input_type(declared[name][0])
                if not (ltype == out_type == want or want == "*"):
                    raise WorkflowError(f"link {link[0]}: {nodes[src]['type']} output {src_slot} is {out_type}, "
                                        f"link says {ltype}, {ntype}.{name} takes {want}")
                linked[name] = link
        for name, (spec, req) in declared.items():
            if req and name not in linked and not is_widget(spec):
                raise WorkflowError(f"node {node['id']} ({ntype}): required input {name!r} is not connected")
        slots = widget_slots(cls)
        values = node.get("widgets_values", [])
        if len(values) != len(slots):
            raise WorkflowError(f"node {node['id']} ({ntype}): {len(values)} widget values for {len(slots)} widgets "
                                f"{[s[0] or s[1][0] for s in slots]}")
        for (name, spec), value in zip(slots, values):
            if name is None:
                if spec[0] == "CONTROL" and value not in ("fixed", "increment", "decrement", "randomize"):
                    raise WorkflowError(f"node {node['id']}: bad control_after_generate value {value!r}")
                continue
            if name in linked:
                continue
            if not check_files and input_type(spec) == "COMBO" and (ntype.endswith("Loader") or ntype in BUILTINS):
                continue
            _check_value(f"node {node['id']} ({ntype}).{name}", spec, value)
        for slot, out in enumerate(node.get("outputs", [])):
            if cls.RETURN_TYPES[slot] != out["type"]:
                raise WorkflowError(f"node {node['id']} ({ntype}) output {slot} is {cls.RETURN_TYPES[slot]}, "
                                    f"workflow says {out['type']}")
            for lid in out.get("links") or []:
                if links[lid][1] != node["id"] or links[lid][2] != slot:
                    raise WorkflowError(f"link {lid} listed on node {node['id']} output {slot} starts elsewhere")


def to_api(workflow: dict, mappings: dict) -> dict:
    """The API-format prompt ComfyUI's front end would POST for this workflow."""
    classes = {**BUILTINS, **mappings}
    links = {l[0]: l for l in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in NOTE_TYPES:
            continue
        cls = classes[node["type"]]
        inputs = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        for (name, _), value in zip(widget_slots(cls), node.get("widgets_values", [])):
            if name is not None and name not in inputs:
                inputs[name] = value
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def execute(prompt: dict, mappings: dict) -> dict:
    """Run an API-format prompt node by node in dependency order, each under ``torch.inference_mode()``
    as ComfyUI does; returns {node_id: outputs}."""
    classes = {**BUILTINS, **mappings}
    results: dict[str, tuple] = {}
    pending = dict(prompt)
    while pending:
        ready = [k for k, v in pending.items()
                 if all(not isinstance(x, list) or x[0] in results for x in v["inputs"].values())]
        if not ready:
            raise WorkflowError(f"cycle or missing node among {list(pending)}")
        for key in sorted(ready, key=int):
            spec = pending.pop(key)
            cls = classes[spec["class_type"]]
            kwargs = {k: results[v[0]][v[1]] if isinstance(v, list) else v for k, v in spec["inputs"].items()}
            with torch.inference_mode():  # as ComfyUI runs every node
                out = getattr(cls(), cls.FUNCTION)(**kwargs)
            if isinstance(out, dict):
                out = out.get("result", ())
            results[key] = tuple(out)
    return results


def run_workflow(path: str | os.PathLike, mappings: dict, input_dir: str | os.PathLike,
                 overrides: dict | None = None) -> dict:
    """Validate and execute a workflow file; returns {node_id: outputs}; saved images in SaveImage.saved.
    ``overrides`` maps (class_type, input name) to a value replacing the widget's (e.g. a smaller
    resolution so tiny models run fast)."""
    LoadImage.input_dir = LoadImageMask.input_dir = str(input_dir)
    SaveImage.saved = []
    workflow = json.loads(Path(path).read_text())
    validate(workflow, mappings)
    prompt = to_api(workflow, mappings)
    for (ctype, name), value in (overrides or {}).items():
        for node in prompt.values():
            if node["class_type"] == ctype and name in node["inputs"]:
                node["inputs"][name] = value
    return execute(prompt, mappings)
