"""The iHarmony4 dataset as published (reference/evaluation.md).

Layout::

    <root>/IHD_train.txt, IHD_test.txt            lines like  HAdobe5k/composite_images/a0001_1_1.jpg
    <root>/<Subset>/<Subset>_train.txt, _test.txt lines like  a0001_1_1.jpg
    <root>/<Subset>/composite_images/a0001_1_1.jpg
    <root>/<Subset>/masks/a0001_1.png             (the composite's name without its last _N)
    <root>/<Subset>/real_images/a0001.jpg         (the name up to the first _)

The subset follows from the name's first letter: a = HAdobe5k, c = HCOCO, d = Hday2night, f = HFlickr.
List lines may also be written ``composite_images/<name>`` or ``<Subset>/composite_images/<name>``.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core import image_io
from ..core.errors import InputError

SUBSETS = ("HAdobe5k", "HCOCO", "HFlickr", "Hday2night")  # the order of the paper's tables
PREFIX_TO_SUBSET = {"a": "HAdobe5k", "c": "HCOCO", "d": "Hday2night", "f": "HFlickr"}
SUBSET_TO_PREFIX = {subset: prefix for prefix, subset in PREFIX_TO_SUBSET.items()}
SPLITS = ("train", "test")
# Published sizes of the test split (reference/evaluation.md); train: 65,742 pairs in all.
TEST_COUNTS = {"HCOCO": 4283, "HAdobe5k": 2160, "HFlickr": 828, "Hday2night": 133}
COMPOSITE_DIR, MASK_DIR, REAL_DIR = "composite_images", "masks", "real_images"


@dataclass(frozen=True)
class Sample:
    """One composite of the dataset and the files that belong to it."""

    name: str  # composite file stem, e.g. "a0001_1_1" (unique over the whole dataset)
    subset: str
    composite: Path
    mask: Path
    real: Path

    @property
    def rel(self) -> str:
        """The composite's path as the root list writes it."""
        return f"{self.subset}/{COMPOSITE_DIR}/{self.composite.name}"


def subset_of(name: str) -> str:
    """Subset of a composite/mask/real file name from its first letter."""
    stem = Path(name).name
    subset = PREFIX_TO_SUBSET.get(stem[:1].lower())
    if subset is None:
        raise InputError(f"cannot tell the iHarmony4 subset of {name!r}: names start with a (HAdobe5k), "
                         f"c (HCOCO), d (Hday2night) or f (HFlickr)")
    return subset


def related_names(composite_file: str) -> tuple[str, str]:
    """Mask and real file names of a composite file name: ``c100_1_1.jpg -> (c100_1.png, c100.jpg)``."""
    stem = Path(composite_file).stem
    parts = stem.split("_")
    if len(parts) < 3 or not all(parts):
        raise InputError(f"{composite_file!r} is not an iHarmony4 composite name: expected "
                         f"<image>_<mask>_<n>.jpg, e.g. c100_1_1.jpg")
    return "_".join(parts[:-1]) + ".png", parts[0] + ".jpg"


def make_sample(root: str | os.PathLike, composite_file: str) -> Sample:
    """Sample for a composite file name (just the name, or a list line) under ``root``."""
    fname = Path(composite_file.replace("\\", "/")).name
    subset = subset_of(fname)
    mask_name, real_name = related_names(fname)
    base = Path(root) / subset
    return Sample(Path(fname).stem, subset, base / COMPOSITE_DIR / fname, base / MASK_DIR / mask_name,
                  base / REAL_DIR / real_name)


def _read_list(path: Path) -> list[str]:
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def list_file(root: str | os.PathLike, split: str, subset: str | None = None) -> Path:
    """``IHD_<split>.txt`` (or ``<Subset>/<Subset>_<split>.txt`` for one subset)."""
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    if subset is None:
        return Path(root) / f"IHD_{split}.txt"
    return Path(root) / subset / f"{subset}_{split}.txt"


def _check_subsets(subsets) -> tuple[str, ...]:
    if subsets is None:
        return SUBSETS
    if isinstance(subsets, str):
        subsets = [s for s in subsets.split(",") if s.strip()]
    by_lower = {s.lower(): s for s in SUBSETS}
    out = []
    for s in subsets:
        name = by_lower.get(str(s).strip().lower())
        if name is None:
            raise InputError(f"unknown iHarmony4 subset {s!r}: expected some of {', '.join(SUBSETS)}")
        if name not in out:
            out.append(name)
    return tuple(out)


def list_split(root: str | os.PathLike, split: str = "test", subsets=None, check_files: bool = True,
               limit: int | None = None) -> list[Sample]:
    """Samples of a split, in list order.

    Reads ``IHD_<split>.txt`` when present (keeping the wanted subsets), else the per-subset lists.
    ``limit`` keeps the first N samples of each subset (handy for a quick run). With ``check_files``
    every composite, mask and real file must exist; the error lists what is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"iHarmony4 folder not found: {root}")
    wanted = _check_subsets(subsets)
    main = list_file(root, split)
    entries: list[str] = []
    if main.is_file():
        entries = _read_list(main)
    else:
        missing_lists = []
        for s in wanted:
            sub = list_file(root, split, s)
            if sub.is_file():
                entries += _read_list(sub)
            else:
                missing_lists.append(str(sub))
        if missing_lists:
            raise InputError(
                f"no {split} list in {root}: expected {main} (all subsets) or the per-subset lists; missing "
                + ", ".join(missing_lists))
    samples, seen, per_subset = [], set(), {}
    for line in entries:
        sample = make_sample(root, line)
        if sample.subset not in wanted or sample.name in seen:
            continue
        if limit is not None and per_subset.get(sample.subset, 0) >= limit:
            continue
        per_subset[sample.subset] = per_subset.get(sample.subset, 0) + 1
        seen.add(sample.name)
        samples.append(sample)
    if not samples:
        raise InputError(f"the {split} list of {root} has no composite of the subsets {', '.join(wanted)}")
    if check_files:
        check_samples(samples)
    return samples


def check_samples(samples: list[Sample]) -> None:
    """Raise InputError listing missing files (first few, and how many in all)."""
    missing = [str(p) for s in samples for p in (s.composite, s.mask, s.real) if not p.is_file()]
    if missing:
        shown = "\n  ".join(missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InputError(f"{len(missing)} iHarmony4 files named by the list are missing:\n  {shown}{more}\n"
                         f"expected <root>/<Subset>/{{{COMPOSITE_DIR},{MASK_DIR},{REAL_DIR}}}/ as published")


# ------------------------------------------------------------------------------------------ reading
def _shrink(x: torch.Tensor, max_side: int | None, mode: str) -> torch.Tensor:
    """``[C,H,W]`` float resized so its long side is at most ``max_side``."""
    h, w = x.shape[-2:]
    if not max_side or max(h, w) <= max_side:
        return x
    s = max_side / max(h, w)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    if mode == "nearest":
        return F.interpolate(x[None], size=size, mode="nearest-exact")[0]
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def load_sample(sample: Sample, max_side: int | None = None) -> dict:
    """IMAGE/MASK tensors of one sample: ``composite``/``real`` ``[1,H,W,3]`` 0..1, ``mask`` ``[1,H,W]``.

    ``max_side`` pre-resizes (antialiased bilinear; mask nearest after binarising) so the long side is at
    most that many pixels, as many methods do with the large HAdobe5k images.
    """
    if max_side is not None and max_side < 8:  # 0 was silently taken as "no resize"
        raise InputError(f"max_side {max_side}: expected a long side of at least 8 pixels, or None for the "
                         f"images' own size")
    comp = image_io.read_image(sample.composite).permute(2, 0, 1)
    real = image_io.read_image(sample.real).permute(2, 0, 1)
    mask = image_io.read_mask(sample.mask)[None]
    if comp.shape != real.shape or comp.shape[-2:] != mask.shape[-2:]:
        raise InputError(f"{sample.name}: composite {tuple(comp.shape[-2:])}, real {tuple(real.shape[-2:])} and "
                         f"mask {tuple(mask.shape[-2:])} sizes differ; expected one size for all three")
    if max_side:
        comp = _shrink(comp, max_side, "bilinear").clamp(0, 1)
        real = _shrink(real, max_side, "bilinear").clamp(0, 1)
        mask = _shrink((mask >= 0.5).float(), max_side, "nearest")
    return {"composite": comp.permute(1, 2, 0)[None].contiguous(), "real": real.permute(1, 2, 0)[None].contiguous(),
            "mask": mask, "name": sample.name, "subset": sample.subset}


# ------------------------------------------------------------------------------------ training data
def name_seed(name: str, seed: int = 0) -> int:
    """A 63-bit seed from a name and a base seed: the same on every process and machine."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def random_resized_crop_box(height: int, width: int, generator: torch.Generator, scale=(0.5, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering ``scale`` of the area with aspect in ``ratio`` (the
    RandomResizedCrop rule: 10 tries, then a centred crop clamped to the ratio range)."""
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            v = torch.rand(2, generator=generator).tolist()
            top = min(int(v[0] * (height - h + 1)), height - h)
            left = min(int(v[1] * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PairDataset(torch.utils.data.Dataset):
    """Training pairs at ``resolution x resolution``: ``comp``/``real`` ``[3,R,R]`` in -1..1, ``mask``
    ``[1,R,R]`` in {0,1}, plus ``name``/``subset``.

    Augmentation as DiffHarmony's training loader: horizontal flip (p=0.5) and a random resized crop
    (scale 0.5-1, aspect 3/4-4/3, up to 5 tries to keep at least 1 % of foreground); bilinear antialiased
    resize, mask binarised at 0.5 afterwards. Randomness comes from (seed, epoch, name), so a sample is the
    same whatever worker or process loads it; call ``set_epoch`` to draw new crops.

    ``cache_dir``: a folder of ``<name>.png`` results of a harmonizer (e.g. ``benchmark --save-images`` on
    the train split); each is brought to the composite's size and cropped/flipped with it as ``harm``.
    """

    def __init__(self, samples: list[Sample], resolution: int = 512, random_crop: bool = True,
                 flip: bool = True, seed: int = 0, max_side: int | None = None,
                 cache_dir: str | os.PathLike | None = None):
        if resolution < 8:
            raise InputError(f"resolution must be at least 8, got {resolution}")
        if not samples:
            raise InputError("the training set is empty")
        self.samples = list(samples)
        self.resolution = int(resolution)
        self.random_crop = random_crop
        self.flip = flip
        self.seed = int(seed)
        self.epoch = 0
        self.max_side = max_side
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir is not None:
            missing = [s.name for s in self.samples if not (self.cache_dir / f"{s.name}.png").is_file()]
            if missing:
                raise InputError(f"{len(missing)} of {len(self.samples)} cached results are missing in "
                                 f"{self.cache_dir} (first: {missing[0]}.png); expected <name>.png for every "
                                 f"training composite")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(name_seed(self.samples[index].name, self.seed * 1000003 + self.epoch))

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        d = load_sample(s, self.max_side)
        harm = None
        if self.cache_dir is not None:
            harm = image_io.read_image(self.cache_dir / f"{s.name}.png").permute(2, 0, 1)
            h, w = d["composite"].shape[1:3]
            if tuple(harm.shape[-2:]) != (h, w):
                harm = F.interpolate(harm[None], size=(h, w), mode="bilinear", align_corners=False,
                                     antialias=True)[0].clamp(0, 1)
            harm = harm.permute(1, 2, 0)
        return self.transform(d["composite"][0], d["real"][0], d["mask"][0], self.generator(index), harm) | {
            "name": s.name, "subset": s.subset}

    def transform(self, comp: torch.Tensor, real: torch.Tensor, mask: torch.Tensor, gen: torch.Generator,
                  harm: torch.Tensor | None = None) -> dict:
        """``comp``/``real`` (and ``harm``) ``[H,W,3]`` 0..1 and ``mask`` ``[H,W]`` -> augmented tensors."""
        parts = [comp.permute(2, 0, 1), real.permute(2, 0, 1), (mask >= 0.5).float()[None]]
        if harm is not None:
            parts.append(harm.permute(2, 0, 1))
        x = torch.cat(parts, 0)
        if self.flip and float(torch.rand(1, generator=gen)) < 0.5:
            x = x.flip(-1)
        h, w = x.shape[-2:]
        if self.random_crop:
            for _ in range(5):
                top, left, ch, cw = random_resized_crop_box(h, w, gen)
                crop = x[:, top:top + ch, left:left + cw]
                if crop[6].sum() >= 0.01 * ch * cw:
                    break
            x = crop
        r = self.resolution
        if tuple(x.shape[-2:]) != (r, r):
            x = F.interpolate(x[None], size=(r, r), mode="bilinear", align_corners=False, antialias=True)[0]
        out = {"comp": (x[:3].clamp(0, 1) * 2 - 1), "real": (x[3:6].clamp(0, 1) * 2 - 1),
               "mask": (x[6:7] >= 0.5).float()}
        if harm is not None:
            out["harm"] = x[7:10].clamp(0, 1) * 2 - 1
        return out


def collate(batch: list[dict]) -> dict:
    """Stack tensors, keep strings as lists."""
    out = {}
    for key in batch[0]:
        vals = [b[key] for b in batch]
        out[key] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out
