"""nodes/host.py: plain-torch behaviour outside ComfyUI, and ComfyUI's progress bar, cancel, model
management and model folders when its modules are importable (stood in for by recording fakes)."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from comfyui_harmonize.nodes import diffharmony as N
from comfyui_harmonize.nodes import host
from conftest import make_composite


class Interrupted(Exception):
    pass


@pytest.fixture
def fake_comfy(monkeypatch, models_root):
    calls = {"updates": [], "loaded": [], "checks": 0, "interrupt_after": None}

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            calls["updates"].append((value, total))

    def throw_exception_if_processing_interrupted():
        calls["checks"] += 1
        if calls["interrupt_after"] is not None and calls["checks"] > calls["interrupt_after"]:
            raise Interrupted("cancelled by the user")

    mm = types.SimpleNamespace(
        get_torch_device=lambda: torch.device("cpu"), unet_offload_device=lambda: torch.device("cpu"),
        intermediate_device=lambda: torch.device("cpu"), should_use_bf16=lambda d: False,
        throw_exception_if_processing_interrupted=throw_exception_if_processing_interrupted,
        load_models_gpu=lambda patchers, **kw: calls["loaded"].append((list(patchers), kw)),
        soft_empty_cache=lambda: None)

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device):
            self.model = model

    registered = {}
    fp = types.SimpleNamespace(
        models_dir=str(models_root), folder_names_and_paths={},
        add_model_folder_path=lambda name, path: registered.setdefault(name, []).append(path),
        get_folder_paths=lambda name: registered.get(name, [str(models_root / name)]))
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    for name, mod in {"comfy": comfy, "comfy.model_management": mm, "comfy.utils": types.SimpleNamespace(ProgressBar=ProgressBar),
                      "comfy.model_patcher": types.SimpleNamespace(ModelPatcher=ModelPatcher), "folder_paths": fp}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    calls["registered"] = registered
    return calls


def test_outside_comfy_plain_torch(monkeypatch):
    for name in ("comfy", "comfy.model_management", "comfy.utils", "comfy.model_patcher", "folder_paths"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    assert not host.in_comfy()
    assert host.torch_device().type in ("cpu", "cuda")
    assert host.default_dtype(torch.device("cpu")) == torch.float32
    assert host.default_dtype(torch.device("cuda")) == torch.float16
    monkeypatch.setenv(host.MODELS_ENV, "/x/models")
    assert host.model_roots("diffharmony") == ["/x/models/diffharmony"]
    p = host.Progress(3)
    p(1, 3)
    host.check_interrupt()
    m = torch.nn.Linear(2, 2)
    assert host.load_to_device(m) == host.torch_device()


def test_in_comfy_progress_cancel_and_model_management(fake_comfy, models_root):
    assert host.in_comfy()
    host.register_model_folders()
    assert fake_comfy["registered"]["diffharmony"] == [str(models_root / "diffharmony")]
    (model,) = N.HarmonizeDiffHarmonyLoader().load("diffharmony/DiffHarmony", "auto")
    image, mask = make_composite(64, 64)
    (lat,) = N.HarmonizeDiffHarmonyEncode().encode(model, image, 256, "keep aspect", 0)
    (lm,) = N.HarmonizeMaskToLatent().downsample(mask, lat)
    N.HarmonizeDiffHarmonySampler().sample(model, lat, lm, 0, 4, "euler_ancestral", 1.0)
    assert fake_comfy["updates"] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    (encode_load, encode_kw), (sample_load, sample_kw) = fake_comfy["loaded"]
    # one patcher per component, each holding just that network, loaded whole (never partially)
    assert [p.model["module"] for p in encode_load] == [model.vae]
    assert [p.model["module"] for p in sample_load] == [model.unet, model.text_encoder]
    assert encode_kw == sample_kw == {"force_full_load": True}
    N.HarmonizeDiffHarmonyDecode().decode(model, lat)
    assert fake_comfy["loaded"][-1][0][0] is encode_load[0]  # the same patcher, reused across nodes
    fake_comfy["interrupt_after"] = fake_comfy["checks"] + 2
    with pytest.raises(Interrupted):
        N.HarmonizeDiffHarmonySampler().sample(model, lat, lm, 0, 5, "euler_ancestral", 1.0)
    assert fake_comfy["updates"][-1] == (2, 5)  # stopped between steps


def test_samples_are_copied_into_the_input_folder_only_when_absent(tmp_path, monkeypatch):
    from pathlib import Path

    samples = Path(host.__file__).resolve().parents[1] / "samples"
    inputs = tmp_path / "input"
    assert host.install_samples(inputs) == list(host.SAMPLES)
    for name in host.SAMPLES:
        assert (inputs / name).read_bytes() == (samples / name).read_bytes()
    assert host.install_samples(inputs) == []  # already there: nothing to do
    mine = b"the user's own file"
    (inputs / host.SAMPLES[0]).write_bytes(mine)
    (inputs / host.SAMPLES[1]).unlink()
    assert host.install_samples(inputs) == [host.SAMPLES[1]]
    assert (inputs / host.SAMPLES[0]).read_bytes() == mine  # never replaced
    # through ComfyUI's folder_paths, as at pack load
    fp = types.SimpleNamespace(get_input_directory=lambda: str(tmp_path / "comfy_input"))
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    assert host.install_samples() == list(host.SAMPLES)
    assert sorted(p.name for p in (tmp_path / "comfy_input").iterdir()) == sorted(host.SAMPLES)


def test_samples_copy_failure_is_reported_not_raised(tmp_path, caplog):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    assert host.install_samples(blocker) == []
    assert "could not copy the sample" in caplog.text


def test_pack_declares_its_front_end_extension():
    from pathlib import Path

    import comfyui_harmonize

    root = Path(comfyui_harmonize.__file__).parent
    web = (root / comfyui_harmonize.WEB_DIRECTORY).resolve()
    scripts = sorted(p.name for p in web.rglob("*.js"))
    assert scripts == ["harmonize.js"]
    source = (web / "js" / "harmonize.js").read_text()
    assert "onExecuted" in source
    # ComfyUI serves WEB_DIRECTORY at /extensions/<pack folder>/: every import must resolve to the front
    # end's /scripts/ modules from there
    import re
    from urllib.parse import urljoin

    imports = re.findall(r'^import .* from "([^"]+)"', source, re.M)
    assert imports and all(urljoin("/extensions/ComfyUI-Harmonize/js/harmonize.js", i).startswith("/scripts/")
                           for i in imports), imports
