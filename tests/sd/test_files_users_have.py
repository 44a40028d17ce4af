"""The files users really have (issue 11): tokenizer.json-only tokenizers, *.fp16 weight variants, folders
holding both .bin and .safetensors, ComfyUI's bundled tokenizer inside a real (namespace-package) ComfyUI,
and a missing tokenizer named with every place searched."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_harmonize.nodes import host
from comfyui_harmonize.pipelines.core.errors import WeightsError
from comfyui_harmonize.pipelines.sd.loading import load_diffusers_folder, load_tokenizer, tokenizer_layout

import tiny_models as tm


def _json_only(src: Path, dst: Path) -> Path:
    """What current transformers save: tokenizer.json + tokenizer_config.json, no vocab.json/merges.txt."""
    from transformers import CLIPTokenizerFast

    CLIPTokenizerFast.from_pretrained(str(src)).save_pretrained(str(dst))
    for name in ("vocab.json", "merges.txt"):
        (dst / name).unlink(missing_ok=True)
    return dst


def test_tokenizer_json_only_gives_the_same_ids(tmp_path):
    bpe = tm.write_tiny_tokenizer(tmp_path / "bpe")
    js = _json_only(bpe, tmp_path / "json")
    assert tokenizer_layout(bpe) == "bpe" and tokenizer_layout(js) == "json"
    a, b = load_tokenizer([bpe]), load_tokenizer([js])
    for text in ("", "a photo of a cat", "golden dusk, snowy winter night"):
        ia = a(text, padding="max_length", max_length=77, truncation=True).input_ids
        ib = b(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert ia == ib


def test_diffusers_folder_with_json_only_tokenizer_loads(tmp_path, models_root):
    folder = tmp_path / "tiny"
    shutil.copytree(models_root / "diffusers" / "tiny-inpaint", folder)
    _json_only(folder / "tokenizer", tmp_path / "tok")
    shutil.rmtree(folder / "tokenizer")
    shutil.copytree(tmp_path / "tok", folder / "tokenizer")
    sd = load_diffusers_folder(folder)
    ref = load_diffusers_folder(models_root / "diffusers" / "tiny-inpaint")
    assert sd.tokenizer("a cat").input_ids == ref.tokenizer("a cat").input_ids


def test_fp16_variant_folder_loads(tmp_path, models_root):
    """A folder whose weights are only *.fp16.safetensors (diffusers' variant naming)."""
    folder = tmp_path / "fp16"
    shutil.copytree(models_root / "diffusers" / "tiny-inpaint", folder)
    for sub, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                      ("text_encoder", "model")):
        f = folder / sub / f"{stem}.safetensors"
        save_file({k: v.half() for k, v in load_file(f).items()}, folder / sub / f"{stem}.fp16.safetensors")
        f.unlink()
    sd = load_diffusers_folder(folder, dtype=torch.float32)
    ref = load_diffusers_folder(models_root / "diffusers" / "tiny-inpaint")
    w, w_ref = sd.unet.conv_in.weight, ref.unet.conv_in.weight
    assert w.dtype == torch.float32 and torch.equal(w, w_ref.half().float())


def test_safetensors_preferred_over_bin(tmp_path, models_root):
    """With both files present the .safetensors is read (the .bin here holds different numbers)."""
    folder = tmp_path / "both"
    shutil.copytree(models_root / "diffusers" / "tiny-inpaint", folder)
    sd_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save({k: torch.zeros_like(v) for k, v in load_file(sd_file).items()},
               folder / "unet" / "diffusion_pytorch_model.bin")
    sd = load_diffusers_folder(folder)
    assert torch.equal(sd.unet.conv_in.weight, load_file(sd_file)["conv_in.weight"])


def test_missing_tokenizer_names_every_place(tmp_path):
    own, comfy_dir = tmp_path / "model" / "tokenizer", tmp_path / "comfy" / "sd1_tokenizer"
    own.mkdir(parents=True)
    with pytest.raises(WeightsError) as err:
        load_tokenizer([own, comfy_dir])
    assert str(own) in str(err.value) and str(comfy_dir) in str(err.value)


@pytest.fixture
def namespace_comfy(tmp_path, monkeypatch):
    """A ComfyUI checkout as it really is: ``comfy/`` without ``__init__.py`` (a namespace package)."""
    root = tmp_path / "ComfyUI"
    pkg = root / "comfy"
    pkg.mkdir(parents=True)
    (pkg / "sd1_clip.py").write_text("")
    tm.write_tiny_tokenizer(pkg / "sd1_tokenizer")
    saved = {k: v for k, v in sys.modules.items() if k == "comfy" or k.startswith("comfy.")}
    for k in saved:
        del sys.modules[k]
    monkeypatch.syspath_prepend(str(root))
    yield pkg
    for k in [k for k in sys.modules if k == "comfy" or k.startswith("comfy.")]:
        del sys.modules[k]
    sys.modules.update(saved)


def test_comfy_tokenizer_found_in_a_namespace_package(namespace_comfy):
    import comfy

    assert getattr(comfy, "__file__", None) is None  # the situation of a real checkout
    assert Path(host.comfy_tokenizer_dir()) == namespace_comfy.resolve() / "sd1_tokenizer"
    assert load_tokenizer([None, host.comfy_tokenizer_dir()])("a cat").input_ids


def test_comfy_tokenizer_dir_is_searched_even_when_empty(namespace_comfy):
    shutil.rmtree(namespace_comfy / "sd1_tokenizer")
    path = host.comfy_tokenizer_dir()
    assert path is not None and Path(path).name == "sd1_tokenizer"
    with pytest.raises(WeightsError, match="sd1_tokenizer"):
        load_tokenizer([None, path])
