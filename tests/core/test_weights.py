"""Strict-load diagnostics live in one place (core/weights.check_keys): every loader reports the same way."""
from __future__ import annotations

import pytest
import torch

from comfyui_harmonize.pipelines.core.errors import WeightsError
from comfyui_harmonize.pipelines.core.weights import check_keys, load_into


def test_one_report_of_shapes_missing_and_unexpected_keys():
    own = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    with pytest.raises(WeightsError) as e:
        check_keys(own, {"a": torch.zeros(4), "c": torch.zeros(1), "x": torch.zeros(1), "y": torch.zeros(1)},
                   "f.safetensors", "the model")
    assert str(e.value) == ("weights in f.safetensors do not fit the model: 1 shape mismatches: a (file (4,), "
                            "model (2,)); 1 missing keys: b; 2 unexpected keys: x, y")
    many = {f"k{i:02d}": torch.zeros(1) for i in range(14)}
    with pytest.raises(WeightsError, match=r"14 missing keys: k00, k01, .*, k11, \.\.\. \(2 more\)$"):
        check_keys(many, {}, "f", "the model")
    check_keys(own, {**own, "extra": torch.zeros(1)}, "f", "the model", unexpected_ok=True)  # tolerated
    layer = torch.nn.Linear(2, 2)
    with pytest.raises(WeightsError, match=r"^weights in g\.pth do not fit the Linear built from its config: "
                                           r"1 missing keys: bias$"):
        load_into(layer, {"weight": torch.zeros(2, 2)}, "g.pth")
    before = layer.weight.clone()
    assert torch.equal(layer.weight, before)  # nothing loaded on a mismatch
