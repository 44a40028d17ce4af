"""DiffHarmony: our node chain vs a bare diffusers loop on the same model, measured side by side.

    python benchmarks/diffharmony_bench.py [--model PATH] [--resolution 512] [--repeats 5]

Without --model a random-weight model of Stable Diffusion's layout with narrower channels is built in
memory (the ratio is what matters; it does not depend on the weights). Prints median seconds of each and
their ratio (target <= 1.05). With CUDA it also prints seconds per image at the resolution and peak GPU memory.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fixtures"))  # tiny_models, synthetic: shared with the tests

from comfyui_harmonize.nodes import color as C  # noqa: E402
from comfyui_harmonize.nodes import diffharmony as N  # noqa: E402
from comfyui_harmonize.pipelines.diffharmony import pipeline as dh  # noqa: E402
from comfyui_harmonize.pipelines.sd.loading import SDComponents  # noqa: E402


def small_model(device, dtype) -> SDComponents:
    """SD 1.x layout (4 levels, cross-attention on the first three, 8x VAE) at a fifth of the width."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import tiny_models

    torch.manual_seed(0)
    tok = tiny_models.tiny_tokenizer(Path(tempfile.mkdtemp()) / "tok")
    unet = UNet2DConditionModel(
        in_channels=9, block_out_channels=(64, 128, 256, 256), layers_per_block=2, cross_attention_dim=256,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(block_out_channels=(32, 64, 128, 128), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=1024,
                                      num_attention_heads=4, num_hidden_layers=4, max_position_embeddings=77))
    mods = [m.to(device=device, dtype=dtype).eval() for m in (unet, vae, te)]
    return SDComponents(*mods, tok, tiny_models.SCHEDULER_CONFIG, "random small SD layout", dtype)


@torch.no_grad()
def bare_loop(sd, image, mask, seed, steps, res):
    """The same computation written directly with diffusers components, no pack code."""
    from diffusers import EulerAncestralDiscreteScheduler

    device, dtype = sd.unet.device, sd.unet.dtype
    _, h, w, _ = image.shape
    s = res / max(h, w)
    size = (round(h * s / 8) * 8, round(w * s / 8) * 8)
    x = (F.interpolate(image.permute(0, 3, 1, 2), size=size, mode="bilinear", antialias=True) * 2 - 1)
    sf = sd.vae.config.scaling_factor
    cond = sd.vae.encode(x.to(device, dtype)).latent_dist.sample(dh.generator(seed, "encode")) * sf
    m = F.interpolate((mask >= 0.5).float()[:, None], size=cond.shape[-2:], mode="nearest").to(device, dtype)
    ids = sd.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
    emb = sd.text_encoder(ids)[0]
    sched = EulerAncestralDiscreteScheduler.from_config(sd.scheduler_config)
    sched.set_timesteps(steps, device=device)
    gen = torch.Generator().manual_seed(seed)
    lat = (torch.randn(cond.shape, generator=gen) * sched.init_noise_sigma).to(device, dtype)
    for t in sched.timesteps:
        inp = torch.cat([sched.scale_model_input(lat, t), m, cond], 1)
        lat = sched.step(sd.unet(inp, t, encoder_hidden_states=emb).sample, t, lat, generator=gen).prev_sample
    out = (sd.vae.decode(lat / sf).sample / 2 + 0.5).clamp(0, 1).float().cpu()
    up = F.interpolate(out, size=(h, w), mode="bilinear", antialias=True).permute(0, 2, 3, 1)
    m4 = mask[..., None]
    return torch.where(m4 > 0, up * m4 + image * (1 - m4), image)


def node_chain(sd, image, mask, seed, steps, res):
    (lat,) = N.HarmonizeDiffHarmonyEncode().encode(sd, image, res, "keep aspect", seed)
    (lm,) = N.HarmonizeMaskToLatent().downsample(mask, lat)
    (out,) = N.HarmonizeDiffHarmonySampler().sample(sd, lat, lm, seed, steps, "euler_ancestral", 1.0)
    (dec,) = N.HarmonizeDiffHarmonyDecode().decode(sd, out)
    return C.HarmonizeRestore().restore(dec, image, mask, 0, "resample")[0]


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="DiffHarmony archive / diffusers inpainting folder / checkpoint")
    p.add_argument("--resolution", type=int, default=None, help="working resolution (default 1024 on CUDA, 512 on CPU)")
    p.add_argument("--image-size", type=int, nargs=2, default=(859, 1280), metavar=("H", "W"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    res = args.resolution or (1024 if device.type == "cuda" else 512)
    if args.model:
        sd = dh.load_diffharmony(args.model, dtype=dtype)
        for mod in sd.modules().values():
            mod.to(device)
    else:
        sd = small_model(device, dtype)
    from synthetic import make_composite

    image, mask = make_composite(*args.image_size, seed=0)
    node_chain(sd, image, mask, 0, args.steps, res)  # warm-up (and the cached empty-prompt embedding)
    bare_loop(sd, image, mask, 0, args.steps, res)
    ours, bare = [], []
    for i in range(args.repeats):  # interleaved so both see the same machine state
        t, a = timed(lambda: node_chain(sd, image, mask, i, args.steps, res), device)
        ours.append(t)
        t, b = timed(lambda: bare_loop(sd, image, mask, i, args.steps, res), device)
        bare.append(t)
    diff = (a - b).abs().max().item()
    mo, mb = statistics.median(ours), statistics.median(bare)
    print(f"model: {sd.source}; device {device}, {dtype}; image {args.image_size[1]}x{args.image_size[0]}, "
          f"working long side {res}, {args.steps} steps, {args.repeats} interleaved repeats")
    print(f"node chain   median {mo:.3f} s   (all: {', '.join(f'{t:.3f}' for t in ours)})")
    print(f"bare loop    median {mb:.3f} s   (all: {', '.join(f'{t:.3f}' for t in bare)})")
    print(f"ratio node chain / bare loop: {mo / mb:.3f}   (max |difference| of outputs: {diff:.2e})")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        t, _ = timed(lambda: node_chain(sd, image, mask, 0, args.steps, res), device)
        print(f"CUDA: {t:.2f} s per image at {res}px, peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
