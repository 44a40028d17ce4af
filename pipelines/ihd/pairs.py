"""Training pairs from the user's own photos: DiffHarmony's inverse model turns each (photo, mask) into
inharmonious composites whose ground truth is the photo, written in the iHarmony4 layout (dataset.py) so the
training commands read them like the published dataset.

What the authors do (scripts/inference/inverse.py, scripts/inference_generate_data.sh,
scripts/misc/classify_cand_gen_data.py): for each mask, ``--rounds`` candidate composites from the inverse
model (5 Euler-ancestral steps, guidance 1, empty prompt, the real background pasted back), saved as JPEG
quality 100 named ``<mask name>_<round>.jpg``; then their harmony classifier scores every candidate and the
most "unharmonious" one is copied into ``composite_images/``. Here:

- **Input.** ``photos`` is a folder of image files; ``masks`` a folder where a photo ``<stem>.<ext>`` has its
  masks named ``<stem>.<ext>`` or ``<stem>_<anything>.<ext>`` (any image suffix; several masks per photo).
  A mask belongs to the photo with the LONGEST stem it matches, so ``a_b_1.png`` goes to ``a_b.jpg`` when
  both ``a.jpg`` and ``a_b.jpg`` exist. A photo's masks are taken in name order. Files whose suffix is not
  an image suffix, and hidden files, are ignored. Everything is checked before any model is loaded
  (:func:`plan`): a photo without a mask, a mask without a photo, two photos with one stem, a mask whose
  size differs from its photo's (EXIF rotation applied), an empty mask (no pixel >= 0.5), an unreadable or
  truncated file (photos and masks are decoded whole here, one at a time); one InputError lists every
  problem.
- **Names.** The user's names may hold "_" or start with any letter, which the iHarmony4 rules forbid, so
  every photo is renamed to the subset's letter and a running number in name order (``f1``, ``f2``...), its
  masks to ``f1_1``, ``f1_2``... in name order, and a composite of round ``r`` to ``f1_1_<r>``. The mapping
  back to the user's files is ``<Subset>/<Subset>_<split>_sources.csv``.
- **Files.** ``real_images/f1.jpg``: the photo once, JPEG quality 100 (the reader expects ``.jpg``);
  ``masks/f1_1.png``: the mask, 8-bit grey; ``composite_images/f1_1_<r>.jpg``: JPEG quality 100 as the
  authors save theirs (8-bit levels rounded, where their ``to_pil_image`` truncates). The composite is made
  from the photo and mask AS WRITTEN (the decoded JPEG, the 8-bit mask), so the composite's background is
  the ground truth's pixels up to the composite's own JPEG encoding.
- **Seeds.** Round ``r`` (1-based) of every pair runs with seed ``seed + r - 1`` (:func:`round_seed`), the
  seed of the DiffHarmony pipeline (pipeline.stream_seed derives its random streams from it): a composite is
  reproduced by the Inverse (Make Composite) node with that seed. The authors reseed one generator with
  their one seed for every batch, so their rounds differ only through the shuffled batch order.
- **Selection.** With an evaluator, each pair keeps only its candidate with the lowest P(harmonious) (the
  authors keep their classifier's highest "unharmony" probability), scored on the JPEG as written; the kept
  file keeps its round number. The authors group candidates by photo, so they keep one composite per photo;
  here one per (photo, mask). Without an evaluator every round is kept.
- **Never overwrites; interrupt-safe; resumable.** It refuses a ``<root>/<Subset>`` that already holds files
  of the dataset (its three folders, its list, its sources CSV, its run record), and a root holding
  ``IHD_<split>.txt`` (the reader would take that list and never see the new one). Every file is created
  exclusively. A pair's lines are appended to the sources CSV and then to ``<Subset>_<split>.txt`` only
  after all its files are written, so a run stopped at any moment leaves a dataset whose list names only
  complete samples (files of the pair being written when it stopped may be left on disk, unlisted; the
  reader ignores them). ``<Subset>_<split>_run.json`` records the run's pairs, settings and models;
  ``resume=True`` continues a stopped run when they are the same: the pairs the list names are kept as they
  are, the unlisted files of the others (this command's own, at the names it gives them) are replaced, and
  the CSV keeps only listed rows; the result equals an uninterrupted run's.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core import cancel as cancelling
from ..core import image_io
from ..core.errors import InputError
from ..diffharmony import pipeline as dh
from ..diffharmony.inverse import make_composite
from . import dataset as ihd

JPEG_QUALITY = 100  # the authors' ``sample.save(..., quality=100)``
DEFAULT_SUBSET = "HFlickr"
MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds
MAX_STEPS = 1000  # Stable Diffusion's schedulers are trained on 1000 timesteps
MAX_RESOLUTION = 16384
SHOWN_PROBLEMS = 20
CSV_FIELDS = ("composite", "mask", "real", "photo_source", "mask_source", "round", "seed", "score")


@dataclass(frozen=True)
class Pair:
    photo: Path
    mask: Path


@dataclass(frozen=True)
class Settings:
    """How the inverse model runs (the authors': 5 steps, 1024 px, square)."""
    rounds: int = 1
    seed: int = 0
    steps: int = dh.DEFAULT_STEPS
    resolution: int = dh.DEFAULT_RESOLUTION
    square: bool = True

    def problems(self) -> list[str]:
        out = []
        if self.rounds < 1:
            out.append(f"--rounds {self.rounds}: expected at least 1 composite per mask")
        elif not 0 <= self.seed <= MAX_SEED - (self.rounds - 1):
            out.append(f"--seed {self.seed} with {self.rounds} rounds: the round seeds seed..seed+{self.rounds - 1} "
                       f"must lie in 0..{MAX_SEED}")
        if not 1 <= self.steps <= MAX_STEPS:
            out.append(f"--steps {self.steps}: expected 1..{MAX_STEPS} (DiffHarmony uses 5)")
        if self.resolution % 8 or not 8 <= self.resolution <= MAX_RESOLUTION:
            out.append(f"--resolution {self.resolution}: expected a multiple of 8 in 8..{MAX_RESOLUTION} "
                       f"(the authors: 1024)")
        return out


@dataclass(frozen=True)
class Plan:
    """Checked pairs, settings and where they go; made by :func:`plan` only."""
    pairs: tuple[Pair, ...]
    root: Path
    subset: str
    split: str
    settings: Settings
    models: tuple[tuple[str, str], ...] = ()  # what made the composites, (role, path), for the run record
    resume: bool = False

    @property
    def record_path(self) -> Path:
        return record_file(self.root, self.split, self.subset)

    def record(self) -> dict:
        """What a resumed run must repeat exactly: the pairs, the settings, the models."""
        return {"pairs": [[str(p.photo.resolve()), str(p.mask.resolve())] for p in self.pairs],
                "settings": dataclasses.asdict(self.settings), "models": dict(self.models)}

    @property
    def list_path(self) -> Path:
        return ihd.list_file(self.root, self.split, self.subset)

    @property
    def sources_path(self) -> Path:
        return sources_file(self.root, self.split, self.subset)


def sources_file(root: str | os.PathLike, split: str, subset: str) -> Path:
    """The CSV mapping the written names to the user's files: ``<root>/<Subset>/<Subset>_<split>_sources.csv``."""
    return Path(root) / subset / f"{subset}_{split}_sources.csv"


def record_file(root: str | os.PathLike, split: str, subset: str) -> Path:
    """The run record (pairs, settings, models) a resumed run is checked against:
    ``<root>/<Subset>/<Subset>_<split>_run.json``."""
    return Path(root) / subset / f"{subset}_{split}_run.json"


def round_seed(seed: int, round_: int) -> int:
    """The seed of round ``round_`` (1-based): ``seed + round_ - 1``."""
    return int(seed) + int(round_) - 1


# ---------------------------------------------------------------------------------------------- checks
def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
                  and f.suffix.lower() in image_io.IMAGE_SUFFIXES)


def find_pairs(photos: str | os.PathLike, masks: str | os.PathLike) -> tuple[list[Pair], list[str]]:
    """The (photo, mask) pairs by the naming rule of the module docstring, and the problems found."""
    photos, masks = Path(photos), Path(masks)
    problems = [f"--{flag} {folder}: folder not found" for flag, folder in (("photos", photos), ("masks", masks))
                if not folder.is_dir()]
    if not problems and photos.resolve() == masks.resolve():
        problems.append(f"--photos and --masks are the same folder {photos}: expected the masks in a folder of "
                        f"their own (a mask named like its photo would be taken for a second photo)")
    if problems:
        return [], problems
    photo_files, mask_files = _image_files(photos), _image_files(masks)
    if not photo_files:
        problems.append(f"no image files in {photos} (expected {', '.join(image_io.IMAGE_SUFFIXES)})")
    by_stem: dict[str, Path] = {}
    for f in photo_files:
        if f.stem in by_stem:
            problems.append(f"two photos named {f.stem}: {by_stem[f.stem].name} and {f.name} (their masks could "
                            f"not be told apart)")
        else:
            by_stem[f.stem] = f
    owned: dict[str, list[Path]] = {stem: [] for stem in by_stem}
    for m in mask_files:
        owners = [s for s in by_stem if m.stem == s or m.stem.startswith(s + "_")]
        if owners:
            owned[max(owners, key=len)].append(m)
        else:
            problems.append(f"mask {m} has no photo: expected a photo named {m.stem}.<ext> or, for a name "
                            f"<stem>_<anything>, <stem>.<ext> in {photos}")
    pairs = []
    for stem, photo in sorted(by_stem.items(), key=lambda kv: kv[1].name):
        if not owned[stem]:
            problems.append(f"photo {photo} has no mask: expected {stem}.png or {stem}_<anything>.png in {masks}")
        pairs += [Pair(photo, m) for m in owned[stem]]
    return pairs, problems


def check_pairs(pairs: list[Pair]) -> list[str]:
    """Problems of the files themselves: unreadable, sizes that differ, empty masks."""
    problems, sizes = [], {}
    for pair in pairs:
        if pair.photo not in sizes:
            try:  # decoded whole: a file cut short after a valid header must fail here, not mid-run
                sizes[pair.photo] = tuple(image_io.read_image(pair.photo, "photo").shape[:2])
            except InputError as exc:
                sizes[pair.photo] = None
                problems.append(str(exc))
        try:
            mask = image_io.read_mask(pair.mask)
        except InputError as exc:
            problems.append(str(exc))
            continue
        size = sizes[pair.photo]
        if size is not None and tuple(mask.shape) != size:
            problems.append(f"mask {pair.mask} is {mask.shape[1]}x{mask.shape[0]} (WxH) but photo {pair.photo} is "
                            f"{size[1]}x{size[0]}: expected a mask of the photo's size")
        if not bool((mask >= 0.5).any()):
            problems.append(f"mask {pair.mask} is empty (no pixel >= 0.5): expected the object in white on black")
    return problems


def dataset_files(root: str | os.PathLike, subset: str, split: str) -> list[Path]:
    """Files of an iHarmony4 dataset already at ``root`` that a new subset ``subset`` would clash with."""
    base = Path(root) / subset
    found = [p for p in (ihd.list_file(root, split, subset), sources_file(root, split, subset),
                         record_file(root, split, subset)) if p.exists()]
    for name in (ihd.COMPOSITE_DIR, ihd.MASK_DIR, ihd.REAL_DIR):
        folder = base / name
        if folder.is_dir():
            found += sorted(folder.iterdir())[:1]
        elif folder.exists():
            found.append(folder)
    return found


def check_output(root: str | os.PathLike, subset: str, split: str, resume: bool = False) -> list[str]:
    root = Path(root)
    if subset not in ihd.SUBSETS:
        return [f"unknown subset {subset!r}: expected one of {', '.join(ihd.SUBSETS)}"]
    if split not in ihd.SPLITS:
        return [f"unknown split {split!r}: expected one of {', '.join(ihd.SPLITS)}"]
    existing = root
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return [f"--out {root}: {existing} is a file, so the dataset folder cannot be created there"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"--out {root}: the folder {existing} is not writable"]
    if ihd.list_file(root, split).exists():
        return [f"--out {root} holds {ihd.list_file(root, split).name}, which the dataset reader takes instead of the "
                f"per-subset lists, so the new {subset}/{subset}_{split}.txt would never be read: choose a new --out"]
    if resume:
        return [] if record_file(root, split, subset).is_file() else [
            f"--resume: nothing to resume in {root / subset}: expected {record_file(root, split, subset).name}, "
            f"written there by the run to continue"]
    clash = dataset_files(root, subset, split)
    if clash:
        return [f"--out {root} already holds an iHarmony4 {subset} dataset (found {', '.join(map(str, clash))}); "
                f"nothing is overwritten: continue a stopped run with --resume, or choose a new --out folder (or "
                f"another --subset)"]
    return []


def plan(photos: str | os.PathLike, masks: str | os.PathLike, root: str | os.PathLike,
         subset: str = DEFAULT_SUBSET, split: str = "train", settings: Settings = Settings(),
         models: dict | None = None, resume: bool = False) -> Plan:
    """Every check that needs no model, before any work; one InputError lists all problems. ``models``
    (role -> path) is recorded with the run; ``resume`` continues the run recorded at ``root`` (the same
    pairs, settings and models, or an error saying what differs)."""
    problems = settings.problems()
    pairs, found = find_pairs(photos, masks)
    problems += found
    problems += check_pairs(pairs)
    problems += check_output(root, subset, split, resume)
    result = Plan(tuple(pairs), Path(root), subset, split, settings,
                  tuple(sorted((str(k), str(v)) for k, v in (models or {}).items())), resume)
    if resume and not problems:
        problems += resume_problems(result)
    if problems:
        shown = "\n  ".join(problems[:SHOWN_PROBLEMS])
        more = f"\n  ... and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        raise InputError(f"{len(problems)} problem(s) with the input, nothing was written:\n  {shown}{more}")
    return result


def resume_problems(plan_: Plan) -> list[str]:
    """What differs between ``plan_`` and the run recorded where it would continue."""
    try:
        old = json.loads(plan_.record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"--resume: cannot read {plan_.record_path}: {exc}"]
    new = plan_.record()
    differ = [k for k in new if old.get(k) != new[k]]
    return [f"--resume: the {k} differ from those of the run recorded in {plan_.record_path} (recorded: "
            f"{json.dumps(old.get(k))[:300]}; now: {json.dumps(new[k])[:300]}); a resumed run must repeat them"
            for k in differ]


def listed(plan_: Plan) -> int:
    """How many composites the plan's list names so far."""
    path = plan_.list_path
    return len(path.read_text(encoding="utf-8").split()) if path.is_file() else 0


# ---------------------------------------------------------------------------------------------- writing
def to_uint8(image: torch.Tensor) -> np.ndarray:
    """IMAGE ``[H,W,3]`` / ``[1,H,W,3]`` or MASK ``[H,W]`` 0..1 -> 8-bit array (rounded)."""
    return (image.squeeze(0).clamp(0, 1).float().cpu().numpy() * 255.0).round().astype(np.uint8)


def jpeg(image: torch.Tensor) -> tuple[bytes, torch.Tensor]:
    """The JPEG (quality 100) of an IMAGE and the ``[1,H,W,3]`` image it decodes to (what the reader gets)."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="JPEG", quality=JPEG_QUALITY)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as img:
        decoded = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return data, torch.from_numpy(decoded)[None]


def png(mask: torch.Tensor) -> tuple[bytes, torch.Tensor]:
    """The 8-bit grey PNG of a MASK and the ``[1,H,W]`` mask it decodes to."""
    arr = to_uint8(mask)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue(), torch.from_numpy(arr.astype(np.float32) / 255.0)[None]


def _write_new(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:  # "x": fail rather than overwrite
        f.write(data)


def _append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _start(plan_: Plan) -> set[str]:
    """Create the run's folders, record, list and CSV; or, resuming, read what the stopped run finished: the
    names of the masks whose composites the list names (the CSV is cut to the listed rows)."""
    for name in (ihd.COMPOSITE_DIR, ihd.MASK_DIR, ihd.REAL_DIR):
        (plan_.root / plan_.subset / name).mkdir(parents=True, exist_ok=True)
    header = io.StringIO()
    csv.writer(header, lineterminator="\n").writerow(CSV_FIELDS)
    if not plan_.resume:
        _write_new(plan_.record_path, json.dumps(plan_.record(), indent=1).encode("utf-8"))
        _write_new(plan_.list_path, b"")
        _write_new(plan_.sources_path, header.getvalue().encode("utf-8"))
        return set()
    if not plan_.list_path.exists():
        _write_new(plan_.list_path, b"")
    listed_names = set(plan_.list_path.read_text(encoding="utf-8").split())
    rows = []
    if plan_.sources_path.exists():  # rows of a pair stopped between the CSV and the list are dropped
        with open(plan_.sources_path, newline="", encoding="utf-8") as f:
            rows = [row for row in csv.DictReader(f) if row["composite"] in listed_names]
    text = io.StringIO()
    csv.DictWriter(text, CSV_FIELDS, lineterminator="\n").writerows(rows)
    tmp = plan_.sources_path.with_name(plan_.sources_path.name + ".tmp")
    tmp.write_text(header.getvalue() + text.getvalue(), encoding="utf-8")
    os.replace(tmp, plan_.sources_path)
    return {Path(name).stem.rsplit("_", 1)[0] for name in listed_names}


def _write_unlisted(path: Path, data: bytes, resume: bool) -> None:
    """A file of a pair the list does not name yet: a stopped run may have left one there (its own, at this
    name, unlisted); a resumed run replaces it."""
    if resume and path.is_file():
        path.unlink()
    _write_new(path, data)


def write_pairs(sd, plan_: Plan, *, condition_vae=None, evaluator=None, callback=None,
                cancel: cancelling.Cancel = None) -> list[dict]:
    """Write the dataset of ``plan_`` with the inverse model ``sd`` (and ``condition_vae`` to decode with, and
    ``evaluator`` to keep the least harmonious candidate; see the module docstring); returns the rows
    written to the sources CSV by this call. ``callback(step, total)`` after every sampler step of every
    round; ``cancel`` is checked inside every stage (a cancelled run leaves a consistent dataset). A plan
    made with ``resume`` skips the pairs the list names and does the rest."""
    rounds, seed, steps = plan_.settings.rounds, plan_.settings.seed, plan_.settings.steps
    letter = ihd.SUBSET_TO_PREFIX[plan_.subset]
    finished = _start(plan_)
    finished_images = {name.split("_")[0] for name in finished}

    total, done = len(plan_.pairs) * rounds * steps, 0
    photo, image_name, real, k, photos = None, "", None, 0, 0
    rows = []
    for pair in plan_.pairs:  # grouped by photo (find_pairs)
        if pair.photo != photo:
            photo, k, photos, real = pair.photo, 0, photos + 1, None
            image_name = f"{letter}{photos}"
        k += 1
        mask_name = f"{image_name}_{k}"
        if mask_name in finished:
            done += rounds * steps
            if callback is not None:
                callback(done, total)
            continue
        # every path is named by the dataset's own rule from a composite name
        real_path = ihd.make_sample(plan_.root, f"{image_name}_1_1.jpg").real
        if real is None and image_name in finished_images:  # listed already: read back as written
            real = image_io.read_image(real_path)[None]
        elif real is None:
            data, real = jpeg(image_io.read_image(photo))
            _write_unlisted(real_path, data, plan_.resume)
        data, mask = png(image_io.read_mask(pair.mask))
        _write_unlisted(ihd.make_sample(plan_.root, f"{mask_name}_1.jpg").mask, data, plan_.resume)

        candidates = []  # (round, JPEG bytes, score or None); only the bytes are kept, not the images
        for r in range(1, rounds + 1):
            cancelling.check(cancel)
            step = None if callback is None else (lambda i, n, at=done: callback(at + i, total))
            composite = make_composite(sd, real, mask, seed=round_seed(seed, r), steps=steps,
                                       resolution=plan_.settings.resolution, square=plan_.settings.square,
                                       condition_vae=condition_vae, callback=step, cancel=cancel)
            done += steps
            data, decoded = jpeg(composite)
            score = None if evaluator is None else float(evaluator(decoded, mask)[0])
            candidates.append((r, data, score))
        if evaluator is not None:  # the least harmonious candidate
            candidates = [min(candidates, key=lambda c: c[2])]
        pair_rows = []
        for r, data, score in candidates:
            sample = ihd.make_sample(plan_.root, f"{mask_name}_{r}.jpg")
            _write_unlisted(sample.composite, data, plan_.resume)
            pair_rows.append({"composite": sample.composite.name, "mask": sample.mask.name, "real": sample.real.name,
                              "photo_source": str(pair.photo), "mask_source": str(pair.mask), "round": r,
                              "seed": round_seed(seed, r), "score": "" if score is None else f"{score:.6f}"})
        text = io.StringIO()
        csv.DictWriter(text, CSV_FIELDS, lineterminator="\n").writerows(pair_rows)
        _append(plan_.sources_path, text.getvalue())
        _append(plan_.list_path, "".join(row["composite"] + "\n" for row in pair_rows))
        rows += pair_rows
    return rows
