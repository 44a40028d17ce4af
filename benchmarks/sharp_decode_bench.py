"""Three ways from a harmonized latent to a full-resolution result, timed side by side in one run.

    python benchmarks/sharp_decode_bench.py [--resolution 512] [--image-size 859 1280] [--repeats 3]

(a) the model's VAE decode, then Restore with ``detail: resample`` (upscale the working-size result);
(b) the condition VAE's decode (its decoder also sees the composite), then the same Restore;
(c) the model's VAE decode, then Restore with ``detail: transfer`` (the colour change applied to the
    full-resolution composite).

The VAEs are random-weight models of Stable Diffusion's VAE layout (4 levels, 2 resnets per level, 8x) at a
quarter of its width, so the cost ratios, not the pictures, are what this measures: (b)'s extra work is a
second encoder pass (the conditional encoder) and the skip convolutions, (c)'s is the transfer at full
resolution. Prints median seconds and the ratios to (a). With CUDA it also prints peak GPU memory per way.

    python benchmarks/sharp_decode_bench.py --tiling [--resolution 2560]

instead decodes one latent of a large working size with the condition VAE whole and in tiles (what the
pipeline does above 2048 px), each in a fresh process, and prints seconds and the peak memory the decode
added (peak GPU memory with CUDA; on the CPU the growth of the process's peak resident size), side by side.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fixtures"))  # tiny_models, synthetic: shared with the tests

from comfyui_harmonize.pipelines.color.restore import restore  # noqa: E402
from comfyui_harmonize.pipelines.diffharmony import condition_vae as cv  # noqa: E402
from comfyui_harmonize.pipelines.core import images  # noqa: E402


def models(device, dtype, width: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    ch = tuple(width * m for m in (1, 2, 4, 4))  # SD's VAE is (128, 256, 512, 512)
    vae = AutoencoderKL(block_out_channels=ch, layers_per_block=2, latent_channels=4, norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)  # SD 1.5's VAE config: 512 px tiles when tiling
    cvae = cv.ConditionVAE.from_vae(vae)
    with torch.no_grad():  # a trained condition VAE's skips are not zero; the cost does not depend on it
        for name, p in cvae.named_parameters():
            if "skip_conv" in name:
                p.normal_(0, 0.01)
    return vae.to(device, dtype).eval(), cvae.to(device, dtype).eval()


@torch.no_grad()
def way(name, vae, cvae, latents, composite, mask):
    if name == "condition vae":
        harmonized = cv.decode(cvae, latents, composite, mask, generator=torch.Generator().manual_seed(0))
    else:
        harmonized = images.from_signed(vae.decode(latents.to(vae.device, vae.dtype)).sample)
    return restore(harmonized, composite, mask, detail="transfer" if name == "detail transfer" else "resample")


def peak_memory(device) -> float:
    """MiB: peak GPU memory allocated, or the process's peak resident size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def tiling_child(tiled: bool, res: int, width: int) -> None:
    """One condition-VAE decode at working long side ``res``, whole or tiled; prints seconds and MiB."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    _, cvae = models(device, dtype, width)
    from synthetic import make_composite

    h, w = images.fit_size(2 * res // 3, res, res, multiple=8)
    composite, mask = make_composite(h, w, seed=0)
    latents = torch.randn(1, 4, h // 8, w // 8, generator=torch.Generator().manual_seed(1))
    cond = cv.condition(composite, mask, (h, w))
    if tiled:
        cvae.enable_tiling()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = peak_memory(device)
    t = time.perf_counter()
    with torch.no_grad():
        out = cv.decode_signed(cvae, latents, cond, torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"{time.perf_counter() - t:.3f} {peak_memory(device) - before:.0f} {w}x{h} {tuple(out.shape)}")


def tiling(res: int, width: int) -> None:
    import subprocess

    rows = {}
    for mode in ("whole", "tiled"):
        done = subprocess.run([sys.executable, __file__, "--tiling-child", mode, "--resolution", str(res),
                               "--width", str(width)], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"the {mode} decode failed:\n{done.stderr[-3000:]}")
        seconds, mib, size, shape = done.stdout.strip().splitlines()[-1].split(" ", 3)
        rows[mode] = (float(seconds), float(mib))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    what = "peak GPU memory added" if device == "cuda" else "peak resident size added"
    print(f"condition VAE decode, device {device}, working size {size}, VAE width {width} (SD: 128), "
          f"512 px tiles overlapping by a quarter; each in a fresh process")
    for mode, (sec, mib) in rows.items():
        print(f"{mode:6s} {sec:8.2f} s ({sec / rows['whole'][0]:4.2f}x)   {what} {mib:7.0f} MiB "
              f"({mib / max(rows['whole'][1], 1):4.2f}x)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=None, help="working long side (default 1024 CUDA, 512 CPU)")
    p.add_argument("--image-size", type=int, nargs=2, default=(859, 1280), metavar=("H", "W"))
    p.add_argument("--width", type=int, default=32, help="VAE base width (SD: 128)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiling", action="store_true", help="the condition VAE whole vs tiled at a large size")
    p.add_argument("--tiling-child", choices=("whole", "tiled"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiling or args.tiling_child:
        res = args.resolution or 2560
        if args.tiling_child:
            return tiling_child(args.tiling_child == "tiled", res, args.width)
        return tiling(res, args.width)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    res = args.resolution or (1024 if device.type == "cuda" else 512)
    vae, cvae = models(device, dtype, args.width)
    from synthetic import make_composite

    composite, mask = make_composite(*args.image_size, seed=0)
    size = images.fit_size(*args.image_size, res, multiple=8)
    latents = torch.randn(1, 4, size[0] // 8, size[1] // 8, generator=torch.Generator().manual_seed(1))
    names = ("vae + resample", "condition vae", "detail transfer")
    times = {n: [] for n in names}
    for n in names:  # warm-up
        way(n, vae, cvae, latents, composite, mask)
    for _ in range(args.repeats):  # interleaved so every way sees the same machine state
        for n in names:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            way(n, vae, cvae, latents, composite, mask)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[n].append(time.perf_counter() - t)
    base = statistics.median(times[names[0]])
    print(f"device {device}, {dtype}; composite {args.image_size[1]}x{args.image_size[0]}, working size "
          f"{size[1]}x{size[0]}; VAE width {args.width} (SD: 128); {args.repeats} interleaved repeats, "
          f"{torch.get_num_threads()} threads")
    for n in names:
        m = statistics.median(times[n])
        print(f"{n:18s} median {m:7.3f} s   ratio to vae + resample {m / base:5.2f}")
    if device.type == "cuda":
        for n in names:
            torch.cuda.reset_peak_memory_stats()
            way(n, vae, cvae, latents, composite, mask)
            print(f"{n:18s} peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
