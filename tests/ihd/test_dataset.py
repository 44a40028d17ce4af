"""iHarmony4 reader on a synthetic dataset written in the published layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from comfyui_harmonize.pipelines.ihd import dataset as ihd
from comfyui_harmonize.pipelines.core.errors import InputError

from ihd_synthetic import make_ihd


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_ihd(tmp_path_factory.mktemp("ihd"))


def test_names_map_as_published():
    assert ihd.related_names("c100_1_1.jpg") == ("c100_1.png", "c100.jpg")
    assert ihd.related_names("a0001_12_3.jpg") == ("a0001_12.png", "a0001.jpg")
    s = ihd.make_sample("/data/IHD", "HAdobe5k/composite_images/a0001_1_1.jpg")
    assert (s.name, s.subset) == ("a0001_1_1", "HAdobe5k")
    assert s.mask.as_posix() == "/data/IHD/HAdobe5k/masks/a0001_1.png"
    assert s.real.as_posix() == "/data/IHD/HAdobe5k/real_images/a0001.jpg"
    assert s.rel == "HAdobe5k/composite_images/a0001_1_1.jpg"
    assert [ihd.subset_of(n) for n in ("a1_1_1.jpg", "c1_1_1.jpg", "d1_1_1.jpg", "f1_1_1.jpg")] == [
        "HAdobe5k", "HCOCO", "Hday2night", "HFlickr"]
    with pytest.raises(InputError, match="subset"):
        ihd.subset_of("x100_1_1.jpg")
    with pytest.raises(InputError, match="composite name"):
        ihd.related_names("c100.jpg")


def test_test_split_from_the_root_list(root):
    samples = ihd.list_split(root, "test")
    assert len(samples) == 16 and len({s.name for s in samples}) == 16
    assert [s.subset for s in samples[::4]] == list(ihd.SUBSETS)
    for s in samples:
        assert s.composite.is_file() and s.mask.is_file() and s.real.is_file()
        assert s.name.startswith({"HAdobe5k": "a", "HCOCO": "c", "HFlickr": "f", "Hday2night": "d"}[s.subset])
    train = ihd.list_split(root, "train")
    assert len(train) == 8 and not ({s.name for s in train} & {s.name for s in samples})


def test_per_subset_lists_when_the_root_list_is_absent(root, tmp_path):
    import shutil

    copy = tmp_path / "ihd"
    shutil.copytree(root, copy)
    (copy / "IHD_test.txt").unlink()
    a = ihd.list_split(root, "test")
    b = ihd.list_split(copy, "test")
    assert [s.name for s in a] == [s.name for s in b]
    (copy / "HCOCO" / "HCOCO_test.txt").unlink()
    assert {s.subset for s in ihd.list_split(copy, "test", subsets="HFlickr")} == {"HFlickr"}
    with pytest.raises(InputError, match="HCOCO_test.txt"):
        ihd.list_split(copy, "test")


def test_subset_filter_and_limit(root):
    got = ihd.list_split(root, "test", subsets="hcoco, HFlickr", limit=3)
    assert [s.subset for s in got] == ["HCOCO"] * 3 + ["HFlickr"] * 3
    with pytest.raises(InputError, match="unknown iHarmony4 subset"):
        ihd.list_split(root, "test", subsets=["HCOCO", "HMars"])
    with pytest.raises(InputError, match="split"):
        ihd.list_split(root, "val")


def test_missing_files_and_folders_are_named(root, tmp_path):
    import shutil

    with pytest.raises(InputError, match="not found"):
        ihd.list_split(tmp_path / "nowhere")
    copy = tmp_path / "ihd"
    shutil.copytree(root, copy)
    gone = copy / "HFlickr" / "masks" / "f0001_1.png"
    gone.unlink()
    with pytest.raises(InputError, match=r"1 iHarmony4 files .* missing") as e:
        ihd.list_split(copy, "test")
    assert str(gone) in str(e.value)
    assert len(ihd.list_split(copy, "test", check_files=False)) == 16
    with pytest.raises(InputError, match="mask file not found"):
        ihd.load_sample(ihd.make_sample(copy, "f0001_1_1.jpg"))


def test_load_sample(root):
    s = ihd.list_split(root, "test", subsets="HCOCO")[0]
    d = ihd.load_sample(s)
    real = np.array(Image.open(s.real).convert("RGB"))
    assert d["composite"].shape == (1, *real.shape) and d["real"].shape == (1, *real.shape)
    assert d["mask"].shape == (1, *real.shape[:2])
    assert torch.equal(d["real"][0], torch.from_numpy(real).float() / 255)
    assert set(d["mask"].unique().tolist()) <= {0.0, 1.0}
    small = ihd.load_sample(s, max_side=32)
    assert max(small["composite"].shape[1:3]) == 32 and small["mask"].shape[1:] == small["composite"].shape[1:3]


def test_crop_box_stays_inside_and_covers_the_scale_range():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = ihd.random_resized_crop_box(48, 64, g)
        assert 0 <= top and 0 <= left and top + h <= 48 and left + w <= 64
        assert 0.5 * 48 * 64 * 0.85 <= h * w <= 48 * 64
        assert 0.7 <= w / h <= 1.45


def test_pair_dataset_is_deterministic_per_name_and_epoch(root):
    samples = ihd.list_split(root, "train")
    ds = ihd.PairDataset(samples, resolution=32, seed=5)
    a, b = ds[3], ds[3]
    assert torch.equal(a["comp"], b["comp"]) and torch.equal(a["mask"], b["mask"])
    assert a["comp"].shape == (3, 32, 32) and a["real"].shape == (3, 32, 32) and a["mask"].shape == (1, 32, 32)
    assert a["comp"].min() >= -1 and a["comp"].max() <= 1 and set(a["mask"].unique().tolist()) <= {0.0, 1.0}
    assert a["name"] == samples[3].name
    # another process/worker holding the samples in another order draws the same crop for the same name
    other = ihd.PairDataset(samples[::-1], resolution=32, seed=5)
    assert torch.equal(other[len(samples) - 4]["comp"], a["comp"])
    ds.set_epoch(1)
    assert not torch.equal(ds[3]["comp"], a["comp"])
    batch = ihd.collate([ds[0], ds[1]])
    assert batch["comp"].shape == (2, 3, 32, 32) and len(batch["name"]) == 2


def test_pair_dataset_without_augmentation_is_a_plain_resize(root):
    s = ihd.list_split(root, "train", subsets="HCOCO")[0]
    item = ihd.PairDataset([s], resolution=24, random_crop=False, flip=False)[0]
    d = ihd.load_sample(s)
    ref = F.interpolate(d["real"].permute(0, 3, 1, 2), size=(24, 24), mode="bilinear", antialias=True,
                        align_corners=False)[0].clamp(0, 1) * 2 - 1
    assert torch.allclose(item["real"], ref, atol=1e-6)
