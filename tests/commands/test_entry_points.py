"""Every command-line entry point lives in commands/; the old ``python -m`` names say where they went."""
from __future__ import annotations

import importlib
import runpy
import tomllib
from pathlib import Path

import pytest
import torch

from comfyui_harmonize.commands import benchmark as bench_cli
from comfyui_harmonize.commands import harmonize as harmonize_cli
from comfyui_harmonize.commands import train as train_cli
from comfyui_harmonize.nodes import host
from comfyui_harmonize.pipelines.core import dtypes
from comfyui_harmonize.pipelines.core.errors import InputError

ROOT = Path(__file__).resolve().parents[2]


def test_every_script_is_a_commands_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"comfyui-harmonize", "harmonize-benchmark", "harmonize-make-pairs",
                            "harmonize-train-diffharmony", "harmonize-train-refiner", "harmonize-train-evaluator",
                            "harmonize-train-condition-vae"}
    for target in scripts.values():
        module, func = target.split(":")
        assert module.startswith("comfyui_harmonize.commands.")
        assert callable(getattr(importlib.import_module(module), func))


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy re-running a loaded module
@pytest.mark.parametrize("old, new", [
    ("comfyui_harmonize.pipelines.benchmark", "comfyui_harmonize.commands.benchmark"),
    ("comfyui_harmonize.pipelines.ihd.benchmark", "comfyui_harmonize.commands.benchmark"),
    ("comfyui_harmonize.pipelines.train_diffharmony", "comfyui_harmonize.commands.train diffharmony"),
    ("comfyui_harmonize.pipelines.training.refiner", "comfyui_harmonize.commands.train refiner"),
])
def test_old_module_names_say_where_the_command_went(old, new, capsys):
    with pytest.raises(SystemExit) as e:
        runpy.run_module(old, run_name="__main__", alter_sys=False)
    assert e.value.code == 2
    assert new in capsys.readouterr().err


def test_train_dispatch_and_usage(capsys):
    assert train_cli.main([]) == 2
    assert "diffharmony,refiner,evaluator" in capsys.readouterr().err
    assert train_cli.main(["evaluator", "--out", "x"]) == 2  # neither --data nor --scores
    assert "harmonize-train-evaluator: error: give --data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli.main(["refiner", "--help"])
    assert "harmonize-train-refiner" in capsys.readouterr().out


def test_one_dtype_rule_for_nodes_command_line_and_benchmark(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert dtypes.resolve_dtype("auto", cpu) == torch.float32
    assert dtypes.resolve_dtype("auto", cuda) == torch.float16
    assert dtypes.resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(InputError, match="dtype must be one of auto, fp32, fp16, bf16, got 'fp8'"):
        dtypes.resolve_dtype("fp8", cpu)
    # the same choices everywhere
    assert list(host.DTYPES) == list(dtypes.DTYPES)
    for parser in (bench_cli.build_parser(),):
        action = next(a for a in parser._actions if a.dest == "dtype")
        assert list(action.choices) == list(dtypes.DTYPES)
    assert harmonize_cli.parse_args(["m", "c", "k", "-o", "x.png", "--dtype", "bf16"]).dtype == "bf16"
    # inside ComfyUI, auto is ComfyUI's own choice for an SD UNet on the device
    asked = []

    class FakeMM:
        @staticmethod
        def get_torch_device():
            return torch.device("cpu")

        @staticmethod
        def unet_dtype(device, supported_dtypes):
            asked.append((device, tuple(supported_dtypes)))
            return torch.bfloat16

    monkeypatch.setattr(host, "_comfy", lambda name: FakeMM if name == "comfy.model_management" else None)
    assert host.dtype_for("auto") == torch.bfloat16 and host.dtype_for("fp16") == torch.float16
    assert asked == [(torch.device("cpu"), (torch.float16, torch.bfloat16, torch.float32))]
