"""Native DiffHarmony measured inside ComfyUI's own Python, in process (issue 11).

    COMFYUI_PATH=/path/to/ComfyUI <comfyui python> tests/native_host_check.py [--json OUT]

Needs ComfyUI's modules (its python: torchvision, einops, ...), so the test suite runs it through the host's
interpreter (tests/diffharmony/test_native_host.py and tests/test_real_host.py); it prints one JSON object.

On tiny random weights in the comfy layout (tests/tiny_models.py, fp32, CPU) it builds ComfyUI's MODEL/CLIP/VAE
with the pack's native loader and the conditioning with the DiffHarmony Conditioning node, samples with
ComfyUI's own sampler, decodes with ComfyUI's VAE, and compares with the pack's diffusers path
(pipelines/diffharmony/pipeline.py) on the same weights:

- ``parity``: both paths from the SAME initial latent x_T and the SAME ancestral noise draws (ComfyUI's
  euler_ancestral given the diffusers generator's stream; its noise tensor divided by ComfyUI's start
  scale so that x_T is the same) and the VAE mean on both sides: what is left is the integer timesteps and
  arithmetic. Max |difference| of the decoded images (0..1).
- ``differences``: each place where ComfyUI's path necessarily differs from the official code, measured
  alone on the decoded image: the start-noise scale, KSampler's own ancestral noise stream, the VAE mean
  instead of a posterior sample, integer timesteps, and a full-size mask resized by ComfyUI.

``partial_loads``: every model the pack loads (the diffusers UNet, VAE and text encoder, the refiner, PiDiNet,
the harmony evaluator, a local VLM) through its own patcher (nodes/host.py: patcher_for) under the calls
ComfyUI makes when memory is short: ``LoadedModel.model_load`` with a small weight budget (a partial load)
and ``model_unload`` with a small amount to free (a partial unload), then a forward pass. A device mismatch
cannot show on a CPU-only machine, so the offload device is made ``meta`` for the partial unload: a layer
moved there fails at the forward as a layer left on another device would. ComfyUI's stock ModelPatcher on a
copy of each module shows the failure this prevents. The native MODEL (ComfyUI's own ops) is partially
loaded too and sampled.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def host_python(comfyui: str) -> str:
    """The interpreter that runs ComfyUI: COMFYUI_PYTHON, else a venv inside or next to the checkout."""
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    root = Path(comfyui).resolve()
    for venv in (root / "venv", root / ".venv", root.parent / "comfy-venv"):
        if (venv / "bin" / "python").is_file():
            return str(venv / "bin" / "python")
    return sys.executable


def setup_comfy(path: str) -> None:
    sys.path.insert(0, path)
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent / "fixtures"))  # tiny_models
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = True


def composite(h: int = 61, w: int = 93, seed: int = 3):
    import torch

    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, 4, 6, generator=g)
    image = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    mask = ((yy / 0.55) ** 2 + (xx / 0.4) ** 2 <= 1).float()[None]
    return image.permute(0, 2, 3, 1).contiguous(), mask


def parity(root: Path, resolution: int = 96, seed: int = 7) -> dict:
    import torch
    import comfy.k_diffusion.sampling as kds
    import comfy.sample
    import comfy.samplers

    import tiny_models
    from comfyui_harmonize.nodes import host
    from comfyui_harmonize.nodes.diffharmony import HarmonizeConditionVAEDecode, HarmonizeDiffHarmonyConditioning
    from comfyui_harmonize.pipelines.diffharmony import condition_vae as cv
    from comfyui_harmonize.pipelines.diffharmony import pipeline as dh
    from comfyui_harmonize.pipelines.sd.models import load_sd

    archive = root / "DiffHarmony"
    tiny_models.save_diffusers_pipeline(archive / "base", in_channels=9, weights="bin", comfy_layout=True)
    model, clip, vae = host.native_sd(archive, torch.float32, torch.float32)
    sd = load_sd(archive)
    image, mask = composite()
    pos, neg, latent = HarmonizeDiffHarmonyConditioning().condition(model, clip, vae, image, mask, resolution,
                                                                     "keep aspect")
    comp = pos[0][1]["concat_latent_image"]
    m_lat = pos[0][1]["concat_mask"][:, 0]
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", 5).float()
    start_scale = float((1 + sigmas[0] ** 2) ** 0.5 / sigmas[0])  # ComfyUI: noise * sqrt(1 + s^2); diffusers: * s

    def comfy_latents(sampler="euler_ancestral", same_start=True, same_stream=True, cond=pos):
        noise = comfy.sample.prepare_noise(latent["samples"], seed)  # = the pack's first draw for this seed
        if not same_stream:
            ks = comfy.samplers.sampler_object(sampler)
        else:
            g = torch.Generator().manual_seed(seed)
            torch.randn(noise.shape, generator=g)  # the pack draws x_T first, then one draw per step
            ks = comfy.samplers.KSAMPLER(functools.partial(getattr(kds, "sample_" + sampler),
                                                           noise_sampler=lambda s, sn: torch.randn(noise.shape, generator=g)))
        if same_start:
            noise = noise / start_scale
        return comfy.sample.sample_custom(model, noise, 1.0, ks, sigmas, cond, cond, latent["samples"], seed=seed,
                                          disable_pbar=True)

    def decoded(lat):
        return dh.decode(sd, lat)

    out: dict = {"resolution": resolution, "latent_size": list(comp.shape[-2:]), "start_scale": start_scale}
    with torch.no_grad():
        mean = dh.encode(sd, image, resolution, sample=False)
        sample_lat = dh.encode(sd, image, resolution, seed=seed, sample=True)
        ref_mean = decoded(dh.sample(sd, mean, dh.latent_mask(mask, mean.shape[-2:]), seed, 5, "euler_ancestral"))
        native = vae.decode(comfy_latents())
        out["concat_latent_vs_pack_mean"] = float((comp - mean).abs().max())
        out["parity"] = float((native - ref_mean).abs().max())
        # the condition VAE on KSampler's LATENT (the Condition-VAE Decode node, as a native graph would use it)
        # vs on the pack sampler's latent: both LATENTs are unscaled, so the decodes agree as the VAE's do
        cvae = cv.load_condition_vae(tiny_models.write_condition_vae(archive / "condition_vae"))
        native_lat = comfy_latents()
        (cv_native,) = HarmonizeConditionVAEDecode().decode(cvae, {"samples": native_lat}, image, mask, seed)
        pack_lat = dh.sample(sd, mean, dh.latent_mask(mask, mean.shape[-2:]), seed, 5, "euler_ancestral")
        cv_pack = dh.decode_with_condition(cvae, pack_lat, image, mask, seed)
        out["condition_vae_parity"] = float((cv_native - cv_pack).abs().max())
        out["condition_vae_vs_vae"] = float((cv_native - native).abs().max())
        # each necessary difference, alone
        ref_sample = decoded(dh.sample(sd, sample_lat, dh.latent_mask(mask, mean.shape[-2:]), seed, 5,
                                       "euler_ancestral"))
        out["differences"] = {
            "start_noise_scale": float((decoded(comfy_latents(same_start=False)) - ref_mean).abs().max()),
            "ksampler_noise_stream": float((decoded(comfy_latents(same_stream=False)) - ref_mean).abs().max()),
            "vae_mean_vs_posterior_sample": float((ref_sample - ref_mean).abs().max()),
        }
        diff_t = dh.make_scheduler("euler_ancestral", sd.scheduler_config)
        diff_t.set_timesteps(5)
        out["timesteps"] = {"diffusers": [float(t) for t in diff_t.timesteps],
                            "comfyui": [float(sampling.timestep(s)) for s in sigmas[:-1]]}
        # the same sampler fed integer timesteps, as ComfyUI does (the sigmas stay the scheduler's)
        make = dh.make_scheduler

        def rounded(name, config):
            sched = make(name, config)
            set_timesteps = sched.set_timesteps

            def set_rounded(*a, **k):
                set_timesteps(*a, **k)
                sched.timesteps = sched.timesteps.round()
            sched.set_timesteps = set_rounded
            return sched

        dh.make_scheduler = rounded
        try:
            ref_int = decoded(dh.sample(sd, mean, dh.latent_mask(mask, mean.shape[-2:]), seed, 5, "euler_ancestral"))
        finally:
            dh.make_scheduler = make
        out["differences"]["integer_timesteps"] = float((ref_int - ref_mean).abs().max())
        out["parity_with_integer_timesteps_in_pack"] = float((native - ref_int).abs().max())
        # a working-size mask given to ComfyUI as concat_mask: it resizes it bilinearly and rounds (not nearest)
        import comfy.utils

        work = (torch.nn.functional.interpolate(mask[:, None], size=tuple(8 * s for s in comp.shape[-2:]),
                                                mode="bilinear") >= 0.5).float()
        full = host.set_conditioning(pos, {"concat_mask": work})
        resized = comfy.utils.common_upscale(work, comp.shape[-1], comp.shape[-2], "bilinear", "center").round()
        out["mask_cells_differing_if_full_size"] = int((resized[:, 0] != m_lat).sum())
        out["mask_cells"] = int(m_lat.numel())
        out["differences"]["full_size_mask"] = float((vae.decode(comfy_latents(cond=full)) - native).abs().max())
    return out


def _forwards(root: Path) -> dict:
    """(module, forward) for every model the pack loads, tiny and random."""
    import torch

    import tiny_models
    import tiny_vlm
    from comfyui_harmonize.pipelines.describe import vlm
    from comfyui_harmonize.pipelines.diffharmony import refiner as rf
    from comfyui_harmonize.pipelines.edges import pidinet
    from comfyui_harmonize.pipelines.evaluation import evaluator
    from comfyui_harmonize.pipelines.sd.models import load_sd

    sd = load_sd(root / "DiffHarmony")
    tiny_models.write_refiner(root / "refinement")
    refiner = rf.load_refiner(root / "refinement")
    torch.manual_seed(0)
    pidi = pidinet.PiDiNet(20, 8, True).eval()
    ev = evaluator.ResNet((1, 1, 1, 1), base_width=8).eval()
    local = vlm.load_local_model(str(tiny_vlm.save_tiny_llava(root / "vlm")), torch.float32)

    def dev(m):
        return next(m.parameters()).device

    ids = torch.tensor([[2, 5, 6, 7]])
    return {
        "diffharmony unet": (sd.unet, lambda m: m(torch.randn(1, 9, 8, 8, device=dev(m)), 500,
                                                   encoder_hidden_states=torch.randn(1, 77, 32, device=dev(m)))),
        "diffharmony vae": (sd.vae, lambda m: m.decode(m.encode(torch.rand(1, 3, 64, 64, device=dev(m))
                                                                ).latent_dist.mode()).sample),
        "text encoder": (sd.text_encoder, lambda m: m(torch.tensor([[583, 584]], device=dev(m)))[0]),
        "refiner": (refiner, lambda m: m(torch.rand(1, 7, 64, 64,
                                                    device=dev(m)))),
        "pidinet": (pidi, lambda m: m(torch.rand(1, 3, 32, 32, device=dev(m)))),
        "harmony evaluator": (ev, lambda m: m(torch.rand(1, 4, 32, 32, device=dev(m)))),
        "local vlm": (local.holder, lambda m: m["vlm"](input_ids=ids.to(dev(m))).logits),
    }


def partial_loads(root: Path) -> dict:
    import copy

    import torch
    import comfy.model_management as mm
    import comfy.model_patcher as mp

    from comfyui_harmonize.nodes import host

    meta = torch.device("meta")
    results = {}
    for name, (module, forward) in _forwards(root).items():
        size = mm.module_size(module)
        budget = max(size // 3, 1)  # a third of its weights fit: ComfyUI would load it partially
        entry = {"mib": round(size / 2 ** 20, 3)}
        # ours: a forced partial load is a full load; a forced partial unload frees nothing -> full unload
        patcher = host.patcher_for(module)
        patcher.offload_device = meta
        loaded = mm.LoadedModel(patcher)
        loaded.model_load(lowvram_model_memory=budget)
        entry["after_partial_load_on"] = sorted({p.device.type for p in module.parameters()})
        freed = patcher.partially_unload(meta, memory_to_free=budget)
        with torch.no_grad():
            forward(module)
        entry["ours"] = f"full load, partial unload freed {freed} bytes, forward ran"
        patcher.offload_device = torch.device("cpu")
        # ComfyUI's stock patcher on a copy: a partial unload leaves part of the module behind
        twin = copy.deepcopy(module)
        stock = mp.ModelPatcher(torch.nn.ModuleDict({"module": twin}), load_device=mm.get_torch_device(), offload_device=meta)
        mm.LoadedModel(stock).model_load(lowvram_model_memory=0)
        stock.partially_unload(meta, memory_to_free=budget)
        devices = {p.device.type for p in twin.parameters()}
        try:
            with torch.no_grad():
                forward(twin)
            entry["stock"] = f"parameters on {sorted(devices)}, forward ran"
        except Exception as exc:  # what a half-moved module does
            entry["stock"] = f"parameters on {sorted(devices)}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        results[name] = entry
    return results


def native_partial_load(root: Path) -> str:
    """The native MODEL/CLIP/VAE (ComfyUI's own ops) partially loaded as ComfyUI does, then used."""
    import torch
    import comfy.model_management as mm

    from comfyui_harmonize.nodes import host

    model, clip, vae = host.native_sd(root / "DiffHarmony", torch.float32, torch.float32)
    out = []
    for name, patcher in (("MODEL", model), ("CLIP", clip.patcher), ("VAE", vae.patcher)):
        loaded = mm.LoadedModel(patcher)
        loaded.model_load(lowvram_model_memory=max(patcher.model_size() // 3, 1))
        out.append(f"{name} lowvram={bool(getattr(patcher.model, 'model_lowvram', False))}")
    with torch.no_grad():
        x = torch.randn(1, 4, 8, 8)
        den = model.model.apply_model(x, torch.tensor([1.0]), c_concat=torch.zeros(1, 5, 8, 8),
                                      c_crossattn=torch.zeros(1, 77, 32))
        cond = host.encode_prompt(clip, "")
        img = vae.decode(torch.zeros(1, 4, 8, 8))
    ok = bool(torch.isfinite(den).all()) and bool(torch.isfinite(cond[0][0]).all()) and bool(torch.isfinite(img).all())
    return ", ".join(out) + f"; denoise, encode, decode ran{' (finite)' if ok else ' (NON-FINITE)'}"


def fp8_unet(root: Path) -> str:
    """The loader's weight_dtype fp8_e4m3fn: the UNet is stored in 8 bits and still denoises (cast per layer)."""
    import torch

    from comfyui_harmonize.nodes import host

    model, _, _ = host.native_sd(root / "DiffHarmony", torch.float8_e4m3fn)
    weight = model.model.diffusion_model.input_blocks[0][0].weight
    with torch.no_grad():
        den = model.model.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), c_concat=torch.zeros(1, 5, 8, 8),
                                      c_crossattn=torch.zeros(1, 77, 32))
    return f"UNet weights {str(weight.dtype).replace('torch.', '')}, denoise {'finite' if torch.isfinite(den).all() else 'NON-FINITE'}"


def run_in_host(python: str, comfyui: str, out: Path, timeout: float = 1200) -> dict:
    """Run this script in the host's Python (from the test process); its JSON result."""
    import subprocess

    # the host's Python has the pack only as a custom node: make this checkout importable as comfyui_harmonize
    # (the package name pip maps onto the repository root) through a link in a folder next to the output
    link_dir = Path(out).resolve().parent / "pack-import"
    link_dir.mkdir(parents=True, exist_ok=True)
    link = link_dir / "comfyui_harmonize"
    if not link.exists():
        link.symlink_to(HERE.parent, target_is_directory=True)
    path = os.pathsep.join(p for p in (str(link_dir), os.environ.get("PYTHONPATH", "")) if p)
    res = subprocess.run([python, str(Path(__file__).resolve()), "--comfyui", comfyui, "--json", str(out)],
                         capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": path})
    if res.returncode != 0 or not Path(out).is_file():
        raise AssertionError(f"native_host_check failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(Path(out).read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""))
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    if not a.comfyui:
        print("COMFYUI_PATH (or --comfyui) is required", file=sys.stderr)
        return 2
    setup_comfy(a.comfyui)
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"parity": parity(Path(tmp))}
        result["partial_loads"] = partial_loads(Path(tmp))
        result["native_partial_load"] = native_partial_load(Path(tmp))
        result["fp8"] = fp8_unet(Path(tmp))
    text = json.dumps(result)
    if a.json:
        Path(a.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
