"""Cancel is honoured in every stage that can take more than a second.

Each stage is run twice: once with a counting cancel check that never fires (how many cancel points it
passes, and that they are spread through the work: one per strip, solver iteration, network block, image
or request poll), and once through its node with ComfyUI's interrupt faked (as tests/nodes/test_host.py
does) firing at a point in the middle: the node raises ComfyUI's exception there and no further unit of
work runs. Hanging stand-ins are bounded by the test runner's timeout, never by timing assertions.
"""
from __future__ import annotations

import socket
import sys
import threading
import types

import pytest
import torch

from comfyui_harmonize.nodes import color as color_nodes
from comfyui_harmonize.nodes import diffharmony as dh_nodes
from comfyui_harmonize.pipelines.color import lut, transfer
from comfyui_harmonize.pipelines.core import cancel as cancelling
from comfyui_harmonize.pipelines.core import images
from comfyui_harmonize.pipelines.describe import vlm
from comfyui_harmonize.pipelines.diffharmony import pipeline as dh
from comfyui_harmonize.pipelines.diffharmony import refiner as rf
from conftest import make_composite


class Interrupted(Exception):
    """Stands in for comfy.model_management.InterruptProcessingException."""


class Counter:
    """A cancel check that counts its calls and raises Interrupted on call ``fire_at`` (never when None)."""

    def __init__(self, fire_at: int | None = None):
        self.calls = 0
        self.fire_at = fire_at

    def __call__(self):
        self.calls += 1
        if self.fire_at is not None and self.calls >= self.fire_at:
            raise Interrupted("cancelled by the user")


@pytest.fixture
def comfy_interrupt(monkeypatch, models_root):
    """ComfyUI's modules faked: throw_exception_if_processing_interrupted is ``calls.check``."""
    check = Counter()
    mm = types.SimpleNamespace(
        get_torch_device=lambda: torch.device("cpu"), unet_offload_device=lambda: torch.device("cpu"),
        intermediate_device=lambda: torch.device("cpu"), should_use_bf16=lambda d: False,
        throw_exception_if_processing_interrupted=lambda: check(),
        load_models_gpu=lambda patchers, **kw: None, soft_empty_cache=lambda: None)
    fp = types.SimpleNamespace(models_dir=str(models_root), add_model_folder_path=lambda *a: None,
                               get_folder_paths=lambda name: [str(models_root / name)],
                               get_output_directory=lambda: str(models_root / "output"))
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    progress = types.SimpleNamespace(ProgressBar=lambda total: types.SimpleNamespace(update_absolute=lambda *a, **k: None))
    patcher = types.SimpleNamespace(ModelPatcher=lambda model, load_device, offload_device: types.SimpleNamespace(model=model))
    for name, mod in {"comfy": comfy, "comfy.model_management": mm, "comfy.utils": progress,
                      "comfy.model_patcher": patcher, "folder_paths": fp}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return check


def count_forwards(module: torch.nn.Module, kind: str = "ResnetBlock2D"):
    """Completed forwards of ``kind`` blocks inside ``module``: a list that grows by one per forward."""
    done = []
    for m in module.modules():
        if type(m).__name__ == kind:
            m.register_forward_hook(lambda *_: done.append(1))
    return done


@pytest.fixture(scope="module")
def sd(models_root):
    return dh.load_diffharmony(models_root / "diffusers" / "tiny-inpaint")


# ------------------------------------------------------------------------------------------- VAE
def test_encode_has_a_cancel_point_before_every_block(sd, comfy_interrupt):
    image, _ = make_composite(64, 64)
    resnets = count_forwards(sd.vae.encoder)
    full = Counter()
    expected = dh.encode(sd, image, 64, seed=0, cancel=full)
    total = len(resnets)
    assert full.calls >= total > 1  # at least one check per resnet block
    resnets.clear()
    comfy_interrupt.fire_at = comfy_interrupt.calls + full.calls // 2
    with pytest.raises(Interrupted):
        dh_nodes.HarmonizeDiffHarmonyEncode().encode(sd, image, 64, dh_nodes.FITS[0], 0)
    assert 0 < len(resnets) < total  # stopped inside the encoder, nothing after the interrupt ran
    assert torch.equal(dh.encode(sd, image, 64, seed=0, cancel=Counter()), expected)  # hooks removed, same result
    assert not any(m._forward_pre_hooks for m in sd.vae.modules())


def test_decode_stops_inside_the_decoder(sd, comfy_interrupt):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    resnets = count_forwards(sd.vae.decoder)
    full = Counter()
    dh.decode(sd, latents, cancel=full)
    total = len(resnets)
    assert full.calls >= total > 1
    resnets.clear()
    comfy_interrupt.fire_at = comfy_interrupt.calls + full.calls // 2
    with pytest.raises(Interrupted):
        dh_nodes.HarmonizeDiffHarmonyDecode().decode(sd, {"samples": latents})
    assert 0 < len(resnets) < total


def test_refine_stops_inside_the_refiner(models_root, comfy_interrupt):
    model = rf.load_refiner(models_root / "diffharmony" / "DiffHarmony" / "refinement")
    image, mask = make_composite(64, 64)
    resnets = count_forwards(model)
    full = Counter()
    rf.refine(model, image, image, mask, 64, cancel=full)
    total = len(resnets)
    assert full.calls >= total > 1
    resnets.clear()
    comfy_interrupt.fire_at = comfy_interrupt.calls + full.calls // 2
    with pytest.raises(Interrupted):
        dh_nodes.HarmonizeRefine().refine(model, image, image, mask, 64, dh_nodes.FITS[0])
    assert 0 < len(resnets) < total


def test_all_in_one_passes_cancel_to_every_stage(sd, models_root):
    """Encode, sampler steps (callback), decode, refiner and paste all reach the cancel check."""
    model = rf.load_refiner(models_root / "diffharmony" / "DiffHarmony" / "refinement")
    image, mask = make_composite(64, 64)
    seen = {"enc": count_forwards(sd.vae.encoder), "dec": count_forwards(sd.vae.decoder), "ref": count_forwards(model)}
    full = Counter()
    dh.harmonize(sd, image, mask, steps=2, resolution=64, refiner=model, refine_resolution=64, cancel=full)
    stages = {k: len(v) for k, v in seen.items()}
    assert full.calls >= sum(stages.values()) + 1  # + at least one paste strip
    # fire in the decoder: the encoder ran in full, the decoder partly, the refiner not at all
    in_encoder = Counter()
    dh.encode(sd, image, 64, cancel=in_encoder)
    for v in seen.values():
        v.clear()
    with pytest.raises(Interrupted):
        dh.harmonize(sd, image, mask, steps=2, resolution=64, refiner=model, refine_resolution=64,
                     cancel=Counter(fire_at=in_encoder.calls + 3))
    assert len(seen["enc"]) == stages["enc"] and 0 < len(seen["dec"]) < stages["dec"] and not seen["ref"]


# ------------------------------------------------------------------------------- color transfer
def test_color_transfer_checks_every_strip(comfy_interrupt, monkeypatch):
    monkeypatch.setattr(transfer, "STRIP_PIXELS", 64 * 40)  # strips of 40 rows at this width: 8 strips
    composite, mask = make_composite(320, 64)
    harmonized = images.resize_images(composite, (80, 16)) * 0.8
    before = composite.clone(), harmonized.clone(), mask.clone()
    full = Counter()
    expected = transfer.transfer_color(composite, harmonized, mask, cancel=full)
    # one check per blur candidate, one before the fit, one per strip
    assert full.calls >= len(transfer.DEFAULT_BLUR_SIGMAS) + 1 + 320 // 40
    comfy_interrupt.fire_at = comfy_interrupt.calls + full.calls - 3  # in the strips
    with pytest.raises(Interrupted):
        color_nodes.HarmonizeColorTransfer().run(composite, harmonized, mask, 0)
    assert torch.equal(composite, before[0]) and torch.equal(harmonized, before[1]) and torch.equal(mask, before[2])
    assert torch.equal(transfer.transfer_color(composite, harmonized, mask, cancel=Counter()), expected)


def test_grid_apply_stops_within_one_strip():
    composite, mask = make_composite(96, 32)
    grid = transfer.fit_local_affine(composite[0].permute(2, 0, 1), composite[0].permute(2, 0, 1) * 0.5, mask[0])
    out = torch.full((96, 32, 3), -1.0)
    with pytest.raises(Interrupted):
        grid.apply(composite[0], out, strip_pixels=32 * 8, cancel=Counter(fire_at=3))
    done = (out[:, :, 0] >= 0).all(1)
    # strips end at grid rows too, so at most 2 strips of <= 8 rows were written: rows 0..k, nothing after
    k = int(done.sum())
    assert 0 < k <= 16 and done[:k].all() and not done[k:].any()


# ------------------------------------------------------------------------------------------ LUT
def test_lut_fit_checks_every_solver_iteration(comfy_interrupt):
    composite, mask = make_composite(48, 48)
    harmonized = composite ** 1.5
    full = Counter()
    fitted = lut.fit_lut(composite, harmonized, mask, 17, cancel=full)
    iterations = sum(fitted.info["cg_iterations"])
    assert iterations > 5 and full.calls == iterations + len(fitted.info["cg_iterations"])
    comfy_interrupt.fire_at = comfy_interrupt.calls + 4
    with pytest.raises(Interrupted):
        color_nodes.HarmonizeFitLUT().run(composite, harmonized, mask, "17", lut.DEFAULT_SMOOTHNESS)
    assert comfy_interrupt.calls == comfy_interrupt.fire_at  # no check, and no iteration, after it fired


def test_lut_apply_checks_every_strip():
    image, mask = make_composite(64, 16)
    table = lut.Lut3D(lut.identity_table(5).float())
    full = Counter()
    lut.apply_lut(image, table, strip_pixels=16 * 8, cancel=full)
    assert full.calls == 64 // 8


# --------------------------------------------------------------------------------------- feather
def test_feather_checks_every_image_and_paste_every_strip(comfy_interrupt):
    composite, mask = make_composite(64, 64, batch=3)
    full = Counter()
    images.paste(composite * 0.5, composite, mask, feather=4, cancel=full)
    assert full.calls == 3 + 1  # one per image (feather), one per strip of PASTE_ROWS rows
    comfy_interrupt.fire_at = comfy_interrupt.calls + 2
    with pytest.raises(Interrupted):
        color_nodes.HarmonizeRestore().restore(composite * 0.5, composite, mask, 4, "resample")


# ------------------------------------------------------------------------------------------ VLM
class HangingServer:
    """Accepts connections and reads the request, then never answers; records when a client hangs up."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.hung_up = threading.Event()
        self.got_request = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        self.hung_up.set()
                        break
                    self.got_request.set()

    def close(self):
        self.sock.close()


@pytest.mark.timeout(60)
def test_ollama_request_in_flight_is_cancelled(comfy_interrupt):
    server = HangingServer()
    try:
        image, mask = make_composite(32, 32)

        def fire_when_sent():
            if server.got_request.is_set():
                raise Interrupted("cancelled by the user")

        backend = vlm.make_backend("ollama", url=server.url, timeout=3600, cancel=fire_when_sent)
        with pytest.raises(Interrupted):
            vlm.describe(backend, image, mask, k=1, retries=0)
        assert server.hung_up.wait(30)  # the connection was closed, not left to the 3600 s timeout
        # through the node: ComfyUI's interrupt fires while the request hangs
        server.got_request.clear()
        server.hung_up.clear()
        comfy_interrupt.fire_at = comfy_interrupt.calls + 10
        from comfyui_harmonize.nodes.describe import HarmonizeDescribe

        with pytest.raises(Interrupted):
            HarmonizeDescribe().describe(image, mask, "ollama", "none", "", server.url, 1, 0.3, 0, 0, "auto",
                                         3600.0, 64)
        assert server.got_request.is_set() and server.hung_up.wait(30)
    finally:
        server.close()


def test_wait_for_runs_in_place_without_cancel_and_passes_errors():
    assert vlm._wait_for(lambda: 5, None) == 5
    with pytest.raises(KeyError):
        vlm._wait_for(lambda: {}["x"], Counter())


def test_transformers_generation_stops_at_the_next_token(tmp_path):
    import tiny_vlm

    folder = tiny_vlm.save_tiny_llava(tmp_path / "LLM" / "tiny-llava")
    backend = vlm.make_backend("transformers", local_model=str(folder), max_tokens=40)
    pictures = vlm.model_images(*make_composite(32, 32), "overlay")
    full = Counter()
    backend.cancel = full
    backend.generate("describe", pictures, 0.0, 0)
    assert full.calls >= 3  # one before, one per generated token
    backend.cancel = Counter(fire_at=full.calls - 1)
    with pytest.raises(Interrupted):
        backend.generate("describe", pictures, 0.0, 0)


def test_inside_removes_hooks_when_cancel_raises():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(Interrupted):
        with cancelling.inside(net, Counter(fire_at=1)):
            net(torch.zeros(1, 2))
    assert not net._forward_pre_hooks
    with cancelling.inside(net, None):
        net(torch.zeros(1, 2))


def test_zero_shot_full_size_paste_checks_cancel():
    from comfyui_harmonize.pipelines.zero_shot.passes import full_size

    image, mask = make_composite(64, 64)
    full = Counter()
    full_size(image * 0.5, image, mask, 0, "transfer", cancel=full)
    assert full.calls >= len(transfer.DEFAULT_BLUR_SIGMAS) + 2  # the transfer's fit and strips, the paste
    with pytest.raises(Interrupted):
        full_size(image * 0.5, image, mask, 0, "transfer", cancel=Counter(fire_at=full.calls // 2))
