"""nodes/host.py behaviours that the real host (tests/test_real_host.py) exposed, checked without ComfyUI:

- ComfyUI reads extra_model_paths.yaml before it imports packs, so the pack's folder names may already exist
  when register_model_folders runs: the default models/<name> must still be registered;
- ComfyUI executes every node under torch.inference_mode(): a node that optimises (backward passes) must
  turn it off and make its inputs and weights normal tensors (host.autograd_node).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import types

import pytest
import torch

from comfyui_harmonize.nodes import host


@pytest.fixture
def fake_folder_paths(tmp_path, monkeypatch):
    """A stand-in for ComfyUI's folder_paths with its add_model_folder_path semantics."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    fp.folder_names_and_paths = {}

    def add_model_folder_path(name, path, is_default=False):
        if name in fp.folder_names_and_paths:
            paths = fp.folder_names_and_paths[name][0]
            if path not in paths:
                paths.insert(0, path) if is_default else paths.append(path)
        else:
            fp.folder_names_and_paths[name] = ([path], set())

    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return fp


def test_default_folder_registered_even_when_extra_model_paths_mapped_it_first(fake_folder_paths):
    fp = fake_folder_paths
    fp.add_model_folder_path("diffharmony", "/mnt/big/diffharmony")  # from the user's extra_model_paths.yaml
    host.register_model_folders()
    host.register_model_folders()  # a second import of the pack adds nothing twice
    default = os.path.join(fp.models_dir, "diffharmony")
    assert host.model_roots("diffharmony") == ["/mnt/big/diffharmony", default]
    for name in host.PACK_FOLDERS:
        assert fp.get_folder_paths(name).count(os.path.join(fp.models_dir, name)) == 1


@dataclasses.dataclass(frozen=True)
class Carried:  # like the zero-shot nodes' inversion results: tensors inside a (frozen) dataclass
    latents: torch.Tensor
    steps: int
    extra: dict


class Optimising:
    """A node that takes a gradient step on its input, as the zero-shot refinement does."""

    def __init__(self, net):
        self.net = net

    def step(self, image, carried):
        host.load_to_device(self.net)
        x = image.clone().requires_grad_(True)
        loss = (self.net(x) - carried.latents).pow(2).mean() + carried.extra["w"].sum() * 0
        loss.backward()
        return x.grad


class Decorated(Optimising):
    step = host.autograd_node(Optimising.step)


def _made_like_comfyui():
    """Weights created by a loader node and inputs made by other nodes: all under inference mode."""
    with torch.inference_mode():
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 4)
        image = torch.rand(2, 4)
        carried = Carried(torch.rand(2, 4), 3, {"w": torch.ones(1)})
    return net, image, carried


def test_optimising_node_fails_under_inference_mode_without_the_decorator():
    net, image, carried = _made_like_comfyui()
    with torch.inference_mode(), pytest.raises(RuntimeError):
        Optimising(net).step(image, carried)


def test_autograd_node_runs_under_inference_mode_and_matches_plain_torch():
    net, image, carried = _made_like_comfyui()
    with torch.inference_mode():
        grad = Decorated(net).step(image, carried)
    assert not any(p.is_inference() for p in net.parameters())  # weights made normal in place
    with torch.inference_mode(False):
        torch.manual_seed(0)
        ref_net = torch.nn.Linear(4, 4)
        x = image.clone().requires_grad_(True)
        ((ref_net(x) - carried.latents.clone()).pow(2).mean()).backward()
    assert torch.equal(grad, x.grad)


def test_normal_copies_only_inference_tensors_and_keeps_structure():
    plain = torch.ones(2)
    with torch.inference_mode():
        inf = torch.zeros(3)
    obj = {"a": [inf, plain], "b": (inf,), "c": Carried(inf, 5, {"w": plain}), "d": "text"}
    out = host.normal(obj)
    assert out["a"][1] is plain and out["c"].extra["w"] is plain and out["d"] == "text"
    assert isinstance(out["b"], tuple) and isinstance(out["c"], Carried) and out["c"].steps == 5
    for t in (out["a"][0], out["b"][0], out["c"].latents):
        assert not t.is_inference() and torch.equal(t, torch.zeros(3))
    assert obj["c"].latents is inf  # the caller's object is not modified
    same = Carried(plain, 1, {})
    assert host.normal(same) is same


def test_materialize_keeps_shared_parameters_shared():
    with torch.inference_mode():
        a = torch.nn.Linear(3, 3)
        seq = torch.nn.Sequential(a, torch.nn.ReLU(), a, torch.nn.BatchNorm1d(3))
    with host.autograd():
        host.load_to_device(seq)
    assert seq[0].weight is seq[2].weight
    assert not any(t.is_inference() for t in list(seq.parameters()) + list(seq.buffers()))
