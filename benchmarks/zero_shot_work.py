"""Zero-shot harmonization: the work per image for each preset, counted, next to the official code's count
for the same settings; seconds per image where CUDA is present.

    python benchmarks/zero_shot_work.py [--presets paper fast draft] [--time] [--model PATH]
                                        [--image FILE --mask FILE] [--resolution 512]

Counting: one harmonization pass per preset runs on a tiny random model (the counts are passes through the
networks, which do not depend on the weights or the resolution) with the pack's WorkCounter hooks. A pass
is one description applied once; the iterative loop makes at most ``candidates + iterations - 1`` passes
per image (K candidates at iteration 0, then one per iteration; fewer when it concludes early), so the
per-image figures are that budget times the counted pass.

The official code's count for the same settings is derived from its source (WindVChen/Diff-Harmonization,
diff_harmon.py / main.py; reference/zero_shot.md "Cost"): it inverts S-1 steps, runs every later stage
over the S-1 timesteps after the first, with the UNet batches [uncond, cond] x prompts:

    inversion      S-1 UNet calls (2 rows: guidance 0 still evaluates the text branch)
    refinement     r(S-1) forward+backward (4 rows) + S-1 forward (4 rows) advancing the latents
    null-text      sum n_i forward+backward (2 rows), each decoding the latent with the VAE and running
                   PiDiNet (no gradient through PiDiNet: its no-grad defect) + S-1 forward (2 rows)
                   advancing; one PiDiNet pass on the reference
    P2P edit       S-1 calls (4 rows)
    VAE            1 encode, 2 decodes (an intermediate preview and the result)

(S = 50, r = 2, n_i = i//10 + 1 gives the reference's 49 / 98 / 145 figures.)

Seconds per image (with --time, by default when CUDA is present): the whole iterative loop on one image
for each preset, on --model (a diffusers folder or single-file checkpoint) or, without it, on a
random-weight Stable Diffusion 2-base built from the configs shipped in pipelines/sd/configs/sd2 (the same
architecture and sizes, so the same time). The composite is --image/--mask, else the house composite of
../shared/data, else a synthetic one.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fixtures"))  # tiny_models, synthetic: shared with the tests

from comfyui_harmonize.pipelines.sd import loading, models as sd_models  # noqa: E402
from comfyui_harmonize.pipelines.zero_shot import passes as zs  # noqa: E402
from comfyui_harmonize.pipelines.zero_shot import loop as zl  # noqa: E402
from comfyui_harmonize.pipelines.describe.descriptions import Description, DescriptionSet  # noqa: E402
from comfyui_harmonize.pipelines.zero_shot.model import WorkCounter, ZeroShotModel  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
NETS = ("unet", "vae_encoder", "vae_decoder", "pidinet", "text_encoder")
DESCRIPTIONS = [Description("house", ("bright",), ("dark",)), Description("house", ("bright",), ("dusk",)),
                Description("house", ("bright",), ("cloudy",))]  # the official demo's captions for the house


def official_pass(s: zs.ZeroShotSettings) -> dict:
    """The official implementation's passes for one pass with the same settings (see the module docstring)."""
    steps = s.steps - 1
    nt = [s.nulltext().iterations(i) for i in range(steps)]
    r = s.refine_iters
    edge = s.edge and not s.painterly
    return {
        "unet": {"forward": steps + r * steps + steps + sum(nt) + steps + steps,
                 "samples": 2 * steps + 4 * r * steps + 4 * steps + 2 * sum(nt) + 2 * steps + 4 * steps,
                 "backward": r * steps + sum(nt), "backward_samples": 4 * r * steps + 2 * sum(nt)},
        "vae_encoder": {"forward": 1, "samples": 1, "backward": 0, "backward_samples": 0},
        "vae_decoder": {"forward": sum(nt) + 2, "samples": sum(nt) + 2, "backward": sum(nt) if edge else 0,
                        "backward_samples": sum(nt) if edge else 0},
        "pidinet": {"forward": sum(nt) + 1, "samples": sum(nt) + 1, "backward": 0, "backward_samples": 0},
    }


def tiny_model() -> ZeroShotModel:
    import tiny_models

    folder = Path(tempfile.mkdtemp()) / "tiny-txt2img"
    tiny_models.save_diffusers_pipeline(folder, in_channels=4)
    return ZeroShotModel(sd_models.load_sd(folder))


def tiny_pidinet():
    from comfyui_harmonize.pipelines.edges.pidinet import PiDiNet

    torch.manual_seed(0)
    return PiDiNet(inplane=4, dil=4, sa=True).eval().requires_grad_(False)


def count_pass(model: ZeroShotModel, s: zs.ZeroShotSettings, pidinet) -> WorkCounter:
    from synthetic import make_composite

    image, mask = make_composite(96, 128, seed=0)
    image_w, mask_w = zs.working_inputs(model, image, mask, 32)
    model.empty_embedding()
    work = WorkCounter()
    zs.harmonize_pass(model, image_w, image_w, mask_w, DESCRIPTIONS[0], replace(s, resolution=32), pidinet, work)
    return work


def fmt(entry: dict | None) -> str:
    if not entry:
        return "-"
    return f"{entry['forward']}f/{entry['backward']}b ({entry['samples']}/{entry['backward_samples']} rows)"


def scale(entry: dict | None, k: int) -> dict | None:
    return {key: v * k for key, v in entry.items()} if entry else None


def print_counts(presets: list[str]) -> None:
    torch.set_num_threads(1)
    model, pidinet = tiny_model(), tiny_pidinet()
    print("Work per image: forward f / backward b passes (rows: batch rows of the forward / backward passes); "
          "'ours' counted by hooks,")
    print("'official' = the official code's count for the same settings. Per image = passes per image x per pass.")
    for name in presets:
        s = zs.PRESETS[name]
        passes = s.candidates + s.iterations - 1
        ours = count_pass(model, s, pidinet).as_dict()
        off = official_pass(s)
        print(f"\npreset {name}: {s.steps} steps, guidance {s.guidance}, {s.iterations} iterations, K={s.candidates} "
              f"-> at most {passes} passes per image; refinement {s.refine_iters}/step "
              f"({'on the inversion latents' if s.refine_on_trajectory else 'advancing'}), null-text "
              f"{s.nulltext_iters}+step//{s.nulltext_growth if s.nulltext_growth else 'inf'}, edge {s.edge}")
        print(f"  {'network':13} {'ours per pass':>28} {'official per pass':>28} {'ours per image':>32} "
              f"{'official per image':>32}")
        for net in NETS:
            o, f = ours.get(net), off.get(net)
            if o is None and f is None:
                continue
            print(f"  {net:13} {fmt(o):>28} {fmt(f):>28} {fmt(scale(o, passes)):>32} {fmt(scale(f, passes)):>32}")
        ou, fu = ours["unet"], off["unet"]
        rows_o, rows_f = ou["samples"] + ou["backward_samples"], fu["samples"] + fu["backward_samples"]
        print(f"  UNet rows (forward + backward) per image: ours {rows_o * passes}, official {rows_f * passes} "
              f"(ratio {rows_o / rows_f:.2f})")


# ------------------------------------------------------------------------------------------- timing
def random_sd2(device, dtype) -> ZeroShotModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import tiny_models

    cfg = ROOT / "pipelines" / "configs" / "sd2"
    read = lambda n: json.loads((cfg / n).read_text())  # noqa: E731
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(read("unet.json"))
    vae = AutoencoderKL.from_config(read("vae.json"))
    te = CLIPTextModel(CLIPTextConfig(**read("text_encoder.json")))
    tok_dir = SHARED / "clip_tokenizer"
    tok = (loading.load_tokenizer([tok_dir]) if (tok_dir / "vocab.json").is_file()
           else tiny_models.tiny_tokenizer(Path(tempfile.mkdtemp()) / "tok"))
    mods = [m.to(device=device, dtype=dtype).eval().requires_grad_(False) for m in (unet, vae, te)]
    sd = loading.SDComponents(*mods, tok, read("scheduler.json"), "random SD 2-base", dtype)
    return ZeroShotModel(sd, device)


def load_composite(image_path, mask_path):
    import numpy as np
    from PIL import Image

    if image_path is None and (SHARED / "composites" / "house_composite.png").is_file():
        image_path, mask_path = SHARED / "composites" / "house_composite.png", SHARED / "composites" / "house_mask.png"
    if image_path is None:
        from synthetic import make_composite

        return make_composite(859, 1280, seed=0)
    img = torch.from_numpy(np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float32) / 255)[None]
    m = np.asarray(Image.open(mask_path).convert("RGB"), dtype=np.float32)[..., 0] / 255
    return img, (torch.from_numpy(m)[None] > 0.5).float()


def print_times(presets, model_path, image_path, mask_path, resolution, device) -> None:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if model_path:
        model = ZeroShotModel(sd_models.load_sd(model_path, dtype), device)
        model.unet.to(device), model.vae.to(device), model.text_encoder.to(device)
    else:
        model = random_sd2(device, dtype)
    pidinet = None
    pidi_file = SHARED / "pidinet" / "table5_pidinet-tiny.pth"
    if pidi_file.is_file():
        from comfyui_harmonize.pipelines.edges.pidinet import load_pidinet

        pidinet = load_pidinet(pidi_file).to(device)
    image, mask = load_composite(image_path, mask_path)
    print(f"\nSeconds per image on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'} "
          f"({model.components.source}, {dtype}, working long side {resolution}, composite "
          f"{image.shape[2]}x{image.shape[1]}, PiDiNet {'tiny' if pidinet is not None else 'none'}):")
    for name in presets:
        s = replace(zs.PRESETS[name], resolution=resolution)
        work = WorkCounter()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        _, _, _, scores, results = zl.iterative_batch(model, image, mask, DescriptionSet(DESCRIPTIONS), s,
                                                      pidinet=pidinet, work=work)
        if device.type == "cuda":
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        passes = len(results[0].trials)
        mem = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
        print(f"  {name:6} {sec:8.1f} s per image ({passes} passes, {sec / passes:.1f} s per pass; "
              f"UNet {work.get('unet')} forward / {work.get('unet', 'backward')} backward{mem})")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=list(zs.PRESETS), choices=list(zs.PRESETS))
    ap.add_argument("--time", action="store_true", help="also time the loop (default: only with CUDA)")
    ap.add_argument("--no-time", action="store_true", help="never time")
    ap.add_argument("--model", default=None, help="diffusers folder or single-file checkpoint for the timing")
    ap.add_argument("--image", default=None)
    ap.add_argument("--mask", default=None)
    ap.add_argument("--resolution", type=int, default=512)
    args = ap.parse_args(argv)
    print_counts(args.presets)
    cuda = torch.cuda.is_available()
    if args.no_time or not (cuda or args.time):
        print("\nNo CUDA device: seconds per image not measured (--time measures on the CPU).")
        return
    print_times(args.presets, args.model, args.image, args.mask, args.resolution,
                torch.device("cuda" if cuda else "cpu"))


if __name__ == "__main__":
    main()
