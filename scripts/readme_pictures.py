"""The README's before/after pictures of the weight-free path, made from the shipped sample (samples/).

    python scripts/readme_pictures.py [OUT_DIR]      (default docs/pictures)

- color_match.jpg: the composite | the Lab colour match (``--method color-match``, the command line's
  defaults: matched at up to 1024 px, applied with detail transfer).
- detail_transfer.jpg: a crop of the cat's face: the composite | colour matched at 192 px and resized back
  (detail "resample") | the same 192 px result applied with detail transfer (detail "transfer").
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from comfyui_harmonize.pipelines.color.match import harmonize_color_match
from comfyui_harmonize.pipelines.core import image_io

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "harmonize_sample_cat.jpg"
MASK = ROOT / "samples" / "harmonize_sample_cat_mask.png"


def to_pil(t) -> Image.Image:
    return Image.fromarray((t[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8))


def row(images: list[Image.Image], labels: list[str], height: int) -> Image.Image:
    scaled = [im.resize((round(im.width * height / im.height), height), Image.LANCZOS) for im in images]
    pad, bar = 6, 22
    out = Image.new("RGB", (sum(im.width for im in scaled) + pad * (len(scaled) - 1), height + bar), "white")
    draw, x = ImageDraw.Draw(out), 0
    for im, label in zip(scaled, labels):
        out.paste(im, (x, bar))
        draw.text((x + 4, 5), label, fill="black")
        x += im.width + pad
    return out


def main(out_dir: str = "docs/pictures") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image, mask = image_io.load_image(SAMPLE), image_io.load_mask(MASK)
    matched = harmonize_color_match(image, mask)
    row([to_pil(image), to_pil(matched)], ["composite", "color-match (classical baseline, not DiffHarmony)"],
        300).save(out / "color_match.jpg", quality=88)
    small = 192
    resampled = harmonize_color_match(image, mask, resolution=small, detail="resample")
    transferred = harmonize_color_match(image, mask, resolution=small, detail="transfer")
    box = (390, 90, 690, 330)  # the cat's face, in the 768x515 sample
    crops = [to_pil(t).crop(box) for t in (image, resampled, transferred)]
    row(crops, ["composite", f"matched at {small} px, resampled", f"matched at {small} px, detail transfer"],
        300).save(out / "detail_transfer.jpg", quality=88)
    print(f"wrote {out / 'color_match.jpg'} and {out / 'detail_transfer.jpg'}")


if __name__ == "__main__":
    main(*sys.argv[1:])
