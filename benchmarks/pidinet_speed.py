"""PiDiNet and edge-loss cost: one forward pass, and one edge-loss forward+backward to the image (what the
zero-shot null-text step pays per optimisation step on top of the UNet and the VAE decoder).

Prints, per variant, milliseconds per call and, on the CPU, the ratio of the channels-last feature layout
(the default there) to the plain contiguous layout measured side by side; on CUDA also fp16 and peak memory.
Weights are random (the cost does not depend on their values) unless ``--weights`` names a checkpoint.

    python benchmarks/pidinet_speed.py --size 512 --variants tiny,small,full
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from comfyui_harmonize.pipelines.edges import loss as edges, pidinet

VARIANTS = {"tiny": (20, 8), "small": (30, 12), "full": (60, 24)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def measure(model: pidinet.PiDiNet, size: int, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 3, size, size, generator=g).to(device, dtype)
    img = torch.rand(1, 3, size, size, generator=g).to(device, dtype)
    mask = torch.zeros(1, size, size, device=device)
    mask[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    ref_edges = edges.reference_edges(ref, model)

    def forward():
        with torch.no_grad():
            model(img)

    def loss_backward():
        x = img.clone().requires_grad_(True)
        edges.edge_loss(x, ref_edges, mask, model).backward()

    out = {"forward_ms": timed(forward, device, repeats), "loss_fwd_bwd_ms": timed(loss_backward, device, repeats)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        loss_backward()
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="square image side (the zero-shot working size is 512)")
    ap.add_argument("--variants", default="tiny,small,full")
    ap.add_argument("--weights", default=None, help="a PiDiNet checkpoint to time instead of random variants")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.weights:
        models = {args.weights: pidinet.load_pidinet(args.weights)}
    else:
        models = {}
        for name in args.variants.split(","):
            inplane, dil = VARIANTS[name]
            torch.manual_seed(0)
            models[name] = pidinet.PiDiNet(inplane, dil, sa=True).eval().requires_grad_(False)
    print(f"device {device} ({torch.get_num_threads()} CPU threads), image {args.size}x{args.size}, "
          f"median of {args.repeats}")
    for name, model in models.items():
        model.to(device)
        params = sum(p.numel() for p in model.parameters())
        base = measure(model, args.size, device, torch.float32, args.repeats)
        line = (f"{name:>6} ({params / 1e3:.0f}k params) fp32: forward {base['forward_ms']:.1f} ms, "
                f"edge loss fwd+bwd {base['loss_fwd_bwd_ms']:.1f} ms")
        if "peak_mib" in base:
            line += f", peak {base['peak_mib']:.0f} MiB"
        print(line)
        if device.type == "cpu":
            model.channels_last = False
            plain = measure(model, args.size, device, torch.float32, args.repeats)
            model.channels_last = None
            fwd = plain["forward_ms"] / base["forward_ms"]
            bwd = plain["loss_fwd_bwd_ms"] / base["loss_fwd_bwd_ms"]
            print(f"{'':>6} contiguous layout: forward {plain['forward_ms']:.1f} ms, fwd+bwd "
                  f"{plain['loss_fwd_bwd_ms']:.1f} ms -> channels-last speed-up x{fwd:.2f} / x{bwd:.2f}")
        else:
            model.half()
            half = measure(model, args.size, device, torch.float16, args.repeats)
            model.float()
            print(f"{'':>6} fp16: forward {half['forward_ms']:.1f} ms, edge loss fwd+bwd "
                  f"{half['loss_fwd_bwd_ms']:.1f} ms, peak {half['peak_mib']:.0f} MiB")
        model.cpu()


if __name__ == "__main__":
    main()
