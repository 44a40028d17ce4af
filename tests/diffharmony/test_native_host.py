"""Native DiffHarmony and the pack's model patchers inside ComfyUI's own Python (tests/native_host_check.py):
parity of the native path with the pack's diffusers path on the same weights and noise, each necessary
difference measured, and forced partial loads of every model. Runs only when COMFYUI_PATH points at a
ComfyUI checkout whose Python (COMFYUI_PYTHON, or a venv inside/next to it) has ComfyUI's dependencies."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
if not COMFYUI_PATH or not (Path(COMFYUI_PATH) / "main.py").is_file():
    pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout: the in-process ComfyUI checks need one",
                allow_module_level=True)

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    sys.path.insert(0, str(TESTS))
    sys.path.insert(0, str(TESTS.parent / "fixtures"))  # tiny_models
    import native_host_check

    return native_host_check.run_in_host(native_host_check.host_python(COMFYUI_PATH), COMFYUI_PATH, tmp_path_factory.mktemp("native") / "out.json")


def test_native_equals_the_pack_path(result):
    p = result["parity"]
    assert p["concat_latent_vs_pack_mean"] < 1e-5  # ComfyUI's VAE encode = the pack's VAE mean
    assert p["parity"] < 1e-3  # same x_T and ancestral draws: decoded images agree
    assert p["parity_with_integer_timesteps_in_pack"] < 1e-5  # ... and what is left is the integer timesteps
    assert p["timesteps"]["comfyui"] == [round(t) for t in p["timesteps"]["diffusers"]]


def test_condition_vae_decodes_the_native_latent(result):
    p = result["parity"]
    assert p["condition_vae_parity"] < 1e-3  # KSampler's LATENT through Condition-VAE Decode = the pack's
    assert p["condition_vae_vs_vae"] > 1e-3  # and it is the condition VAE that decoded it, not the VAE


def test_each_necessary_difference_is_measured(result):
    d = result["parity"]["differences"]
    assert set(d) == {"start_noise_scale", "ksampler_noise_stream", "vae_mean_vs_posterior_sample",
                      "integer_timesteps", "full_size_mask"}
    assert d["ksampler_noise_stream"] > 1e-3 and d["vae_mean_vs_posterior_sample"] > 1e-3  # real differences
    assert result["parity"]["start_scale"] > 1.0


def test_forced_partial_loads_run(result):
    loads = result["partial_loads"]
    assert set(loads) == {"diffharmony unet", "diffharmony vae", "text encoder", "refiner", "pidinet",
                          "harmony evaluator", "local vlm"}
    for name, entry in loads.items():
        assert entry["ours"].endswith("forward ran"), (name, entry)
        assert entry["after_partial_load_on"] == ["cpu"], (name, entry)  # nothing left on the offload device
    assert any("Error" in e["stock"] for e in loads.values())  # what the patcher prevents
    assert result["native_partial_load"].endswith("(finite)")


def test_fp8_unet_weights(result):
    assert result["fp8"] == "UNet weights float8_e4m3fn, denoise finite"
