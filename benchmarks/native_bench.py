"""Native DiffHarmony (ComfyUI's loaders, KSampler, VAE) vs the pack's diffusers path, on the same model,
interleaved in one run.

    COMFYUI_PATH=/path/to/ComfyUI <comfyui python> benchmarks/native_bench.py [--resolution 512] [--repeats 5]

Needs ComfyUI's Python (its modules are imported in process). A random-weight model of Stable Diffusion's
layout at reduced width (as benchmarks/diffharmony_bench.py builds, with SD's 32-group norms so ComfyUI's
classes take it) is written as a diffusers folder and loaded by both paths: the pack's loader + Encode /
Sampler / Decode functions, and the native loader + DiffHarmony Conditioning + ComfyUI's sampler
(euler_ancestral / normal / 5 steps / cfg 1) + ComfyUI's VAE decode. Refinement and restore are the same
code on both paths and are left out. Prints the median seconds of each, their ratio, and the peak memory
of each run: on CUDA ``torch.cuda.max_memory_allocated``; on a CPU the peak rise of the process's resident
memory during the run (sampled every 2 ms; the two paths hold their own copy of the weights, loaded
before the timed runs).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_model(folder: Path) -> Path:
    """SD 1.x layout (4 levels, cross-attention on the first three, 8x VAE) at a fifth of the width."""
    import json

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import tiny_models

    torch.manual_seed(0)
    tok = tiny_models.tiny_tokenizer(folder / "tokenizer")
    UNet2DConditionModel(
        in_channels=9, block_out_channels=(64, 128, 256, 256), layers_per_block=2, cross_attention_dim=256,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).save_pretrained(folder / "unet")
    AutoencoderKL(block_out_channels=(32, 64, 128, 128), layers_per_block=2, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                                 num_hidden_layers=4, max_position_embeddings=77, bos_token_id=len(tok) - 2,
                                 eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1)).save_pretrained(
        folder / "text_encoder")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(tiny_models.SCHEDULER_CONFIG))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionInpaintPipeline"}))
    return folder


class Peak:
    """Peak of a memory reading during a block: CUDA's allocator, or the process's RSS sampled by a thread."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        import psutil

        self.proc, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = self.proc.memory_info().rss

        def sample():
            while not self.stop.is_set():
                self.peak = max(self.peak, self.proc.memory_info().rss)
                time.sleep(0.002)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        else:
            self.stop.set()
            self.thread.join()
            self.mib = (self.peak - self.base) / 2 ** 20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""))
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--pytorch-attention", action="store_true",
                    help="ComfyUI's --use-pytorch-cross-attention (on a CPU ComfyUI otherwise uses its "
                         "sub-quadratic attention)")
    a = ap.parse_args(argv)
    if not a.comfyui:
        print("COMFYUI_PATH (or --comfyui) is required: the native path runs ComfyUI's own code", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "fixtures"))  # tiny_models, synthetic: shared with the tests
    import native_host_check

    native_host_check.setup_comfy(a.comfyui)
    from comfy.cli_args import args as comfy_args

    comfy_args.use_pytorch_cross_attention = a.pytorch_attention
    import torch
    import comfy.sample

    from comfyui_harmonize.nodes import diffharmony as N
    from comfyui_harmonize.nodes import host
    from comfyui_harmonize.pipelines.diffharmony import pipeline as dh
    from comfyui_harmonize.pipelines.sd.models import load_sd

    if a.threads:
        torch.set_num_threads(a.threads)
    device = host.torch_device()
    folder = write_model(Path(tempfile.mkdtemp()) / "model")
    sd = load_sd(folder)
    for m in sd.modules().values():
        m.to(device)
    model, clip, vae = host.native_sd(folder, torch.float32, torch.float32)
    image, mask = native_host_check.composite(a.resolution * 3 // 4, a.resolution)

    def pack(seed):
        lat = dh.encode(sd, image, a.resolution, seed)
        out = dh.sample(sd, lat, dh.latent_mask(mask, lat.shape[-2:]), seed, 5, "euler_ancestral")
        return dh.decode(sd, out)

    def native(seed):
        pos, neg, latent = N.HarmonizeDiffHarmonyConditioning().condition(model, clip, vae, image, mask,
                                                                         a.resolution, "keep aspect")
        noise = comfy.sample.prepare_noise(latent["samples"], seed)
        out = comfy.sample.sample(model, noise, 5, 1.0, "euler_ancestral", "normal", pos, neg, latent["samples"],
                                  denoise=1.0, seed=seed, disable_pbar=True)
        return vae.decode(out)

    with torch.no_grad():
        pack(0), native(0)  # warm-up: first-call allocations, ComfyUI loading the models to the device
        times = {"pack (diffusers)": [], "native (ComfyUI)": []}
        peaks = {k: [] for k in times}
        for r in range(a.repeats):
            for name, fn in (("pack (diffusers)", pack), ("native (ComfyUI)", native)):
                with Peak(device) as peak:
                    t0 = time.perf_counter()
                    fn(r)
                    times[name].append(time.perf_counter() - t0)
                peaks[name].append(peak.mib)
    w, h = image.shape[2], image.shape[1]
    import comfy.ldm.modules.attention as comfy_attention

    print(f"DiffHarmony, 5 steps, working size {a.resolution} px long side ({w}x{h} composite), {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.repeats} interleaved repeats; "
          f"ComfyUI attention: {comfy_attention.optimized_attention.__name__}")
    med = {k: statistics.median(v) for k, v in times.items()}
    what = "peak allocated (CUDA)" if device.type == "cuda" else "peak RSS rise"
    for name in times:
        print(f"  {name:18s} median {med[name]:.3f} s  (min {min(times[name]):.3f}, max {max(times[name]):.3f});  "
              f"{what} {statistics.median(peaks[name]):.1f} MiB")
    print(f"  time ratio native / pack: {med['native (ComfyUI)'] / med['pack (diffusers)']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
