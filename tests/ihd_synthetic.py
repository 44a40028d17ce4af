"""A synthetic mini-iHarmony4 written in the published layout, for CPU tests.

Each subset gets real images, masks of several foreground ratios and composites whose foreground has a
colour cast, with the published names (``c0001_1_1.jpg`` -> ``masks/c0001_1.png`` -> ``real_images/c0001.jpg``)
and lists (``IHD_<split>.txt`` at the root, ``<Subset>/<Subset>_<split>.txt`` with bare names).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PREFIX = {"HAdobe5k": "a", "HCOCO": "c", "HFlickr": "f", "Hday2night": "d"}
# (top, left, height, width) as fractions of the image: about 2 %, 9 % and 30 % of the area
BOXES = ((0.40, 0.40, 0.14, 0.14), (0.30, 0.25, 0.30, 0.30), (0.10, 0.15, 0.55, 0.55))


def _smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(0.02, 0.2, 3)
        img[..., c] = 0.5 + 0.3 * np.sin(a * x + p * 6) * np.cos(b * y) + rng.normal(0, 0.03, (h, w))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def make_ihd(root: str | Path, per_subset: int = 2, masks_per_image: int = 2, size=(48, 64),
             train_per_subset: int = 1, seed: int = 0) -> Path:
    """Write the dataset; returns ``root``. Test composites come first in each list, then train ones."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    lists = {"train": [], "test": []}
    for subset, prefix in PREFIX.items():
        sub_lists = {"train": [], "test": []}
        base = root / subset
        for d in ("composite_images", "masks", "real_images"):
            (base / d).mkdir(parents=True, exist_ok=True)
        for i in range(per_subset + train_per_subset):
            split = "test" if i < per_subset else "train"
            h, w = size if i % 2 == 0 else (size[1], size[0])  # portrait and landscape
            real = _smooth_image(rng, h, w)
            stem = f"{prefix}{i + 1:04d}"
            Image.fromarray(real).save(base / "real_images" / f"{stem}.jpg", quality=95)
            for k in range(masks_per_image):
                t, l, bh, bw = BOXES[(i + k) % len(BOXES)]
                mask = np.zeros((h, w), np.uint8)
                mask[int(t * h):int(t * h) + max(1, int(bh * h)), int(l * w):int(l * w) + max(1, int(bw * w))] = 255
                Image.fromarray(mask).save(base / "masks" / f"{stem}_{k + 1}.png")
                cast = rng.uniform(0.6, 1.4, 3)
                comp = real.astype(np.float32)
                inside = mask > 127
                comp[inside] = np.clip(comp[inside] * cast + rng.uniform(-20, 20), 0, 255)
                name = f"{stem}_{k + 1}_1.jpg"
                Image.fromarray(comp.round().astype(np.uint8)).save(base / "composite_images" / name, quality=95)
                sub_lists[split].append(name)
                lists[split].append(f"{subset}/composite_images/{name}")
        for split, names in sub_lists.items():
            (base / f"{subset}_{split}.txt").write_text("\n".join(names) + "\n")
    for split, names in lists.items():
        (root / f"IHD_{split}.txt").write_text("\n".join(names) + "\n")
    return root
