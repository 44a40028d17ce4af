"""The one folder walker behind every model list: links are followed, loops are not (each real folder is
entered once), names are sorted and the same for the same contents; one "not found" message."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from comfyui_harmonize.nodes import host
from comfyui_harmonize.pipelines.core import model_files
from comfyui_harmonize.pipelines.core.errors import WeightsError
from comfyui_harmonize.pipelines.describe import vlm
from comfyui_harmonize.pipelines.diffharmony import refiner as rf
from comfyui_harmonize.pipelines.edges import pidinet
from comfyui_harmonize.pipelines.evaluation import evaluator as ev
from comfyui_harmonize.pipelines.sd import models as sd_models


def touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def archive(folder: Path) -> None:
    """The files the finders look at in a DiffHarmony archive (no weights needed to be listed)."""
    touch(folder / "base" / "model_index.json", "{}")
    touch(folder / "base" / "unet" / "config.json", "{}")
    touch(folder / "refinement" / "config.json", json.dumps({"down_block_types": ["DownBlock2D"] * 2}))
    touch(folder / "refinement" / "diffusion_pytorch_model.safetensors")


@pytest.fixture
def looped_models(tmp_path) -> Path:
    """A models root with every kind of model, a link back to the models root, a link back to a folder's
    own parent, a self-link and a pair of links pointing at each other."""
    root = tmp_path / "models"
    archive(root / "diffharmony" / "DiffHarmony")
    touch(root / "diffusers" / "sd15" / "model_index.json", "{}")
    touch(root / "checkpoints" / "b.safetensors")
    touch(root / "checkpoints" / "A.SAFETENSORS")
    touch(root / "checkpoints" / "notes.txt")
    touch(root / "pidinet" / "table5_pidinet.pth")
    touch(root / "pidinet" / "tiny" / "table5_pidinet-tiny.safetensors")
    touch(root / "harmony_evaluator" / "eval.safetensors")
    touch(root / "LLM" / "tiny-vlm" / "config.json", "{}")
    touch(root / "LLM" / "org" / "vlm2" / "config.json", "{}")
    touch(root / "LLM" / "org" / "vlm2" / "deeper" / "x" / "config.json", "{}")  # below the two levels
    for kind in ("diffharmony", "diffusers", "checkpoints", "pidinet", "harmony_evaluator", "LLM"):
        (root / kind / "to_models").symlink_to(root, target_is_directory=True)  # back to the models root
        (root / kind / "self").symlink_to(root / kind, target_is_directory=True)  # back to its own folder
        os.symlink("me", root / kind / "me")  # a link to itself
        os.symlink("pong", root / kind / "ping")  # two links pointing at each other
        os.symlink("ping", root / kind / "pong")
    return root


@pytest.mark.timeout(60)
def test_a_symlink_loop_neither_hangs_nor_multiplies_choices(looped_models, monkeypatch):
    root = looped_models
    assert list(sd_models.find_models([root / "diffharmony"])) == ["DiffHarmony"]
    assert list(sd_models.find_models([root / "checkpoints"])) == ["A.SAFETENSORS", "b.safetensors"]
    assert list(rf.find_refiners([root / "diffharmony"])) == ["DiffHarmony/refinement"]
    assert list(pidinet.find_checkpoints([root / "pidinet"])) == ["table5_pidinet.pth",
                                                                  "tiny/table5_pidinet-tiny.safetensors"]
    assert list(ev.find_evaluators([root / "harmony_evaluator"])) == ["eval.safetensors"]
    assert list(vlm.local_models([str(root / "LLM")])) == ["org/vlm2", "tiny-vlm"]
    monkeypatch.setenv(host.MODELS_ENV, str(root))
    assert list(host.sd_model_choices(("diffharmony", "diffusers", "checkpoints"))) == [
        "diffharmony/DiffHarmony", "diffusers/sd15", "A.SAFETENSORS", "b.safetensors"]  # files: bare, as ComfyUI


@pytest.mark.timeout(60)
def test_same_contents_same_names_and_each_real_folder_once(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):  # the same contents written in opposite orders
        names = ["z/m.pth", "c.pth", "k/j/x.pth"] if root == a else ["k/j/x.pth", "c.pth", "z/m.pth"]
        for n in names:
            touch(root / n)
    assert list(pidinet.find_checkpoints([a])) == list(pidinet.find_checkpoints([b])) == [
        "c.pth", "k/j/x.pth", "z/m.pth"]
    # a folder linked twice is listed once, under the first name in sorted order; the first root wins a name
    (a / "y").symlink_to(a / "k", target_is_directory=True)
    (a / "b_link").symlink_to(a / "k", target_is_directory=True)
    assert list(pidinet.find_checkpoints([a])) == ["b_link/j/x.pth", "c.pth", "z/m.pth"]
    got = pidinet.find_checkpoints([b, a])
    assert got["c.pth"] == b / "c.pth" and list(got) == ["b_link/j/x.pth", "c.pth", "k/j/x.pth", "z/m.pth"]
    # a model folder linked under a second name is a second choice (it is listed, never entered)
    touch(tmp_path / "sd" / "one" / "model_index.json", "{}")
    (tmp_path / "sd" / "two").symlink_to(tmp_path / "sd" / "one", target_is_directory=True)
    assert sd_models.find_models([tmp_path / "sd"]) == {"one": tmp_path / "sd" / "one", "two": tmp_path / "sd" / "two"}


def test_depth_limit_and_missing_roots(tmp_path):
    touch(tmp_path / "1" / "2" / "3" / "config.json")
    touch(tmp_path / "1" / "2b" / "config.json")
    has_config = lambda d: (d / "config.json").is_file()  # noqa: E731
    assert list(model_files.find([tmp_path], model_dir=has_config, max_depth=2)) == ["1/2b"]
    assert list(model_files.find([tmp_path], model_dir=has_config)) == ["1/2/3", "1/2b"]
    assert model_files.find([tmp_path / "absent"], file_suffixes=(".pth",)) == {}


def test_one_not_found_message_names_every_folder_and_what_was_expected(tmp_path):
    r1, r2 = tmp_path / "one", tmp_path / "two"
    touch(r2 / "have.pth")
    with pytest.raises(WeightsError) as e:
        pidinet.resolve_checkpoint("want.pth", [r1, r2])
    assert str(e.value) == (f"PiDiNet checkpoint 'want.pth' not found. Searched: {r1}, {r2}. Found: have.pth. "
                            f"Expected: a published PiDiNet checkpoint such as table5_pidinet.pth or "
                            f"table5_pidinet-tiny.pth in one of those folders")
    assert pidinet.resolve_checkpoint("have.pth", [r1, r2]) == r2 / "have.pth"
    with pytest.raises(WeightsError, match=r"^local model 'x' not found\. Searched: .*LLM\. Found: nothing\. "
                                           r"Expected: a transformers vision-language model folder"):
        vlm.make_backend("transformers", local_model="x", roots=[str(tmp_path / "LLM")])
