"""harmonize-make-pairs: the user's photos + masks -> an iHarmony4 subset of inverse-model composites that the
dataset reader and the training commands take; the composites are the Inverse node's for the documented
seeds; the evaluator keeps the least harmonious candidate; bad input is refused before any model loads."""
from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_harmonize.commands import pairs as pairs_cli
from comfyui_harmonize.commands import train as train_cli
from comfyui_harmonize.pipelines.core import image_io
from comfyui_harmonize.pipelines.core.errors import InputError
from comfyui_harmonize.pipelines.diffharmony.inverse import load_inverse, make_composite
from comfyui_harmonize.pipelines.evaluation import evaluator as ev
from comfyui_harmonize.pipelines.ihd import dataset as ihd
from comfyui_harmonize.pipelines.ihd import pairs

import tiny_models
from synthetic import make_composite as synthetic_photo

RUN = ["--resolution", "32", "--steps", "2", "--dtype", "fp32", "--device", "cpu"]


def save_photo(path, h, w, seed):
    image, _ = synthetic_photo(h, w, seed=seed)
    Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(path)


def save_mask(path, h, w, box):
    arr = np.zeros((h, w), np.uint8)
    t, l, b, r = box
    arr[t:b, l:r] = 255
    Image.fromarray(arr).save(path)


def user_folders(root):
    """Two photos with user names ("_" inside, letters the iHarmony4 rules would misread); one has two masks."""
    photos, masks = root / "photos", root / "masks"
    photos.mkdir(parents=True)
    masks.mkdir()
    save_photo(photos / "my_cat.png", 40, 48, seed=1)
    save_photo(photos / "beach.jpg", 48, 40, seed=2)
    save_mask(masks / "my_cat_left.png", 40, 48, (8, 4, 30, 22))
    save_mask(masks / "my_cat.png", 40, 48, (10, 20, 36, 44))
    save_mask(masks / "beach.png", 48, 40, (12, 10, 40, 30))
    (photos / "notes.txt").write_text("not an image: ignored")
    return photos, masks


def argv(photos, masks, out, archive, *more):
    return ["--photos", str(photos), "--masks", str(masks), "--out", str(out), "--inverse", str(archive), *RUN, *more]


def read_sources(root, subset="HFlickr", split="train"):
    with open(pairs.sources_file(root, split, subset), newline="") as f:
        return list(csv.DictReader(f))


def jpeg_roundtrip(image):
    """What a JPEG quality 100 file of ``image`` (rounded to 8 bits) reads back as, encoded here with PIL."""
    buf = io.BytesIO()
    Image.fromarray((image[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=100)
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), np.float32) / 255)


@pytest.fixture(scope="module")
def inverse_sd(models_root):
    return load_inverse(models_root / "diffharmony" / "DiffHarmony")


@pytest.fixture(scope="module")
def written(models_root, tmp_path_factory):
    """A 2-round run without an evaluator."""
    tmp = tmp_path_factory.mktemp("pairs")
    photos, masks = user_folders(tmp)
    out = tmp / "data"
    code = pairs_cli.main(argv(photos, masks, out, models_root / "diffharmony" / "DiffHarmony", "--rounds", "2",
                               "--seed", "7"))
    assert code == 0
    return photos, masks, out


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


# ------------------------------------------------------------------------------------------ naming
def test_masks_go_to_the_photo_with_the_longest_matching_stem(tmp_path):
    photos, masks = tmp_path / "p", tmp_path / "m"
    photos.mkdir()
    masks.mkdir()
    for name in ("a.jpg", "a_b.png", "zz.jpg"):
        (photos / name).touch()
    for name in ("a_b_1.png", "a_1.png", "a_b.png", "a.png", "zz_x_y.png", "b.png", ".hidden.png"):
        (masks / name).touch()
    found, problems = pairs.find_pairs(photos, masks)
    assert [(p.photo.name, p.mask.name) for p in found] == [
        ("a.jpg", "a.png"), ("a.jpg", "a_1.png"), ("a_b.png", "a_b.png"), ("a_b.png", "a_b_1.png"),
        ("zz.jpg", "zz_x_y.png")]
    assert len(problems) == 1 and "mask" in problems[0] and "b.png has no photo" in problems[0]
    assert "same folder" in pairs.find_pairs(photos, photos)[1][0]


# ------------------------------------------------------------------------------------------ end to end
def test_written_set_is_an_ihd_subset_mapped_to_the_user_files(written):
    photos, masks, out = written
    samples = ihd.list_split(out, "train", subsets="HFlickr")  # checks every file exists
    # photos in name order (beach, my_cat), masks in name order (my_cat.png, my_cat_left.png), rounds 1..2
    assert [s.name for s in samples] == ["f1_1_1", "f1_1_2", "f2_1_1", "f2_1_2", "f2_2_1", "f2_2_2"]
    assert sorted(p.name for p in (out / "HFlickr" / "real_images").iterdir()) == ["f1.jpg", "f2.jpg"]
    rows = read_sources(out)
    assert [r["composite"] for r in rows] == [s.composite.name for s in samples]
    got = {(r["composite"], r["mask"], r["real"], r["photo_source"], r["mask_source"], r["round"], r["seed"])
           for r in rows}
    assert ("f2_2_2.jpg", "f2_2.png", "f2.jpg", str(photos / "my_cat.png"), str(masks / "my_cat_left.png"), "2",
            "8") in got
    assert ("f1_1_1.jpg", "f1_1.png", "f1.jpg", str(photos / "beach.jpg"), str(masks / "beach.png"), "1", "7") in got
    assert all(r["score"] == "" for r in rows)
    for s, r in zip(samples, rows):
        d = ihd.load_sample(s)
        assert d["composite"].shape == d["real"].shape and d["mask"].shape == d["composite"].shape[:3]
        # the mask is the user's, the real image the user's photo as a JPEG quality 100
        assert torch.equal(image_io.read_mask(s.mask), image_io.read_mask(r["mask_source"]))
        assert torch.equal(d["real"][0], jpeg_roundtrip(image_io.load_image(r["photo_source"])))
        assert not torch.equal(d["composite"], d["real"])


def test_composites_are_the_inverse_model_with_the_documented_seeds(written, inverse_sd):
    _, _, out = written
    for s, row in zip(ihd.list_split(out, "train", subsets="HFlickr"), read_sources(out)):
        assert int(row["seed"]) == 7 + int(row["round"]) - 1
        real, mask = image_io.load_image(s.real), image_io.load_mask(s.mask)
        expected = make_composite(inverse_sd, real, mask, seed=int(row["seed"]), steps=2, resolution=32, square=True)
        assert torch.equal(image_io.read_image(s.composite), jpeg_roundtrip(expected)), s.name
    # rounds differ, and a different seed would have given another file
    a, b = (image_io.read_image(ihd.make_sample(out, f"f1_1_{r}.jpg").composite) for r in (1, 2))
    assert not torch.equal(a, b)


def test_training_commands_run_on_the_written_set(written, models_root, tmp_path, fresh_accelerate_state):
    _, _, out = written
    code = train_cli.main_evaluator(["--data", str(out), "--subsets", "HFlickr", "--layers", "1,1,1,1",
                                     "--base-width", "8", "--size", "32", "--batch-size", "2", "--max-steps", "1",
                                     "--out", str(tmp_path / "evaluator")])
    assert code == 0 and next((tmp_path / "evaluator").rglob("harmony_evaluator.safetensors")).is_file()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    config = tmp_path / "refiner.json"
    config.write_text(json.dumps({**tiny_models.refiner_config(7), "block_out_channels": [8, 8, 16, 16],
                                  "norm_num_groups": 4}))
    code = train_cli.main_refiner(["--data", str(out), "--subsets", "HFlickr", "--diffharmony",
                                   str(models_root / "diffharmony" / "DiffHarmony"), "--config", str(config),
                                   "--resolution", "32", "--refine-resolution", "16", "--gen-steps", "1",
                                   "--batch-size", "2", "--max-steps", "1", "--out", str(tmp_path / "refiner")])
    assert code == 0 and next((tmp_path / "refiner").rglob("diffusion_pytorch_model.safetensors")).is_file()


def test_evaluator_keeps_the_least_harmonious_candidate(models_root, inverse_sd, tmp_path):
    photos, masks = user_folders(tmp_path)
    torch.manual_seed(0)
    model = ev.ResNet((1, 1, 1, 1), base_width=8)
    torch.nn.init.normal_(model.fc.weight, std=1.0)  # scores spread out
    # 64 px: at 32 the last stage is 1x1 and its strided shortcut sees one corner pixel, so all scores tie
    evaluator_file = ev.save_evaluator(model, tmp_path / "evaluator.safetensors", size=64)
    out = tmp_path / "data"
    code = pairs_cli.main(argv(photos, masks, out, models_root / "diffharmony" / "DiffHarmony", "--rounds", "3",
                               "--evaluator", str(evaluator_file), "--subset", "HCOCO"))
    assert code == 0
    evaluator = ev.load_evaluator(evaluator_file)
    samples = ihd.list_split(out, "train", subsets="HCOCO")
    rows = read_sources(out, "HCOCO")
    assert len(samples) == len(rows) == 3  # one composite per mask
    for s, row in zip(samples, rows):
        real, mask = image_io.load_image(s.real), image_io.load_mask(s.mask)
        candidates = torch.stack([jpeg_roundtrip(make_composite(inverse_sd, real, mask, seed=r - 1, steps=2,
                                                                resolution=32, square=True)) for r in (1, 2, 3)])
        scores = evaluator(candidates, mask.expand(3, -1, -1))
        assert float(scores.max()) > float(scores.min())  # a selection that kept the max would differ
        best = int(scores.argmin())
        assert s.name.endswith(f"_{best + 1}") and row["round"] == str(best + 1)
        assert float(row["score"]) == pytest.approx(float(scores[best]), abs=1e-6)
        assert torch.equal(image_io.read_image(s.composite), candidates[best])
        others = [p for p in (out / "HCOCO" / "composite_images").iterdir() if p.stem.startswith(s.name[:-2] + "_")]
        assert others == [s.composite]


# ------------------------------------------------------------------------------------------ refusals
def no_model_load(monkeypatch):
    def loaded(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(pairs_cli, "load_inverse", loaded)
    monkeypatch.setattr(pairs_cli, "load_evaluator", loaded)


def break_photo_without_mask(photos, masks):
    save_photo(photos / "lonely.jpg", 40, 48, seed=3)
    return "photo " + str(photos / "lonely.jpg") + " has no mask"


def break_mask_without_photo(photos, masks):
    save_mask(masks / "ghost_1.png", 40, 48, (1, 1, 9, 9))
    return "mask " + str(masks / "ghost_1.png") + " has no photo"


def break_size(photos, masks):
    save_mask(masks / "beach_big.png", 40, 48, (1, 1, 9, 9))  # beach.jpg is 40x48 (WxH)
    return "beach_big.png is 48x40 (WxH) but photo " + str(photos / "beach.jpg") + " is 40x48"


def break_empty(photos, masks):
    save_mask(masks / "beach_none.png", 48, 40, (0, 0, 0, 0))
    return "beach_none.png is empty"


def break_photo_file(photos, masks):
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    save_mask(masks / "broken.png", 40, 48, (1, 1, 9, 9))
    return "cannot read photo " + str(photos / "broken.jpg")


def break_mask_file(photos, masks):
    (masks / "my_cat_bad.png").write_bytes(b"\x89PNG truncated")
    return "cannot read mask " + str(masks / "my_cat_bad.png")


def break_same_stem(photos, masks):
    save_photo(photos / "beach.png", 48, 40, seed=4)
    return "two photos named beach"


@pytest.mark.parametrize("damage", [break_photo_without_mask, break_mask_without_photo, break_size, break_empty,
                                    break_photo_file, break_mask_file, break_same_stem])
def test_bad_input_is_refused_before_any_model_loads(damage, models_root, tmp_path, monkeypatch, capsys):
    photos, masks = user_folders(tmp_path)
    expected = damage(photos, masks)
    no_model_load(monkeypatch)
    out = tmp_path / "data"
    assert pairs_cli.main(argv(photos, masks, out, models_root / "diffharmony" / "DiffHarmony")) == 2
    err = capsys.readouterr().err
    assert expected in err and err.startswith("harmonize-make-pairs: error: 1 problem(s)") and "Traceback" not in err
    assert not out.exists()


def test_every_problem_is_listed_at_once(models_root, tmp_path, monkeypatch, capsys):
    photos, masks = user_folders(tmp_path)
    wanted = [f(photos, masks) for f in (break_photo_without_mask, break_mask_without_photo, break_empty)]
    no_model_load(monkeypatch)
    assert pairs_cli.main(argv(photos, masks, tmp_path / "d", models_root / "diffharmony" / "DiffHarmony",
                               "--rounds", "0")) == 2
    err = capsys.readouterr().err
    assert "4 problem(s)" in err and "--rounds 0" in err and all(w in err for w in wanted)


def test_missing_model_files_are_named_before_loading(tmp_path, monkeypatch, capsys):
    photos, masks = user_folders(tmp_path)
    no_model_load(monkeypatch)
    assert pairs_cli.main(argv(photos, masks, tmp_path / "d", tmp_path / "nowhere", "--evaluator",
                               str(tmp_path / "e.safetensors"))) == 2
    err = capsys.readouterr().err
    assert "--inverse" in err and "nowhere" in err and "--evaluator" in err


def test_an_existing_dataset_is_never_overwritten(written, models_root, monkeypatch, capsys):
    photos, masks, out = written
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    no_model_load(monkeypatch)
    assert pairs_cli.main(argv(photos, masks, out, models_root / "diffharmony" / "DiffHarmony")) == 2
    assert "already holds an iHarmony4 HFlickr dataset" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # another subset beside it is fine; a root list (which the reader would read instead of ours) is not
    assert pairs.plan(photos, masks, out, "HCOCO").pairs
    (out / "IHD_test.txt").write_text("")
    with pytest.raises(InputError, match="IHD_test.txt"):
        pairs.plan(photos, masks, out, "HCOCO", "test")
    (out / "IHD_test.txt").unlink()


def test_a_stopped_run_leaves_a_consistent_dataset(models_root, inverse_sd, tmp_path):
    photos, masks = user_folders(tmp_path)
    out = tmp_path / "data"
    plan = pairs.plan(photos, masks, out, settings=pairs.Settings(rounds=1, steps=2, resolution=32))

    def stop_in_the_second_pair(step, total):
        if step > 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pairs.write_pairs(inverse_sd, plan, callback=stop_in_the_second_pair)
    assert [s.name for s in ihd.list_split(out, "train", subsets="HFlickr")] == ["f1_1_1"]
    assert [r["composite"] for r in read_sources(out)] == ["f1_1_1.jpg"] and pairs.listed(plan) == 1
    # the stopped pair's real image and mask were written, unlisted; a new run into the same root is refused
    assert (out / "HFlickr" / "masks" / "f2_1.png").is_file()
    with pytest.raises(InputError, match="already holds"):
        pairs.plan(photos, masks, out)
    shutil.rmtree(out)


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_finishes_a_stopped_run_as_an_uninterrupted_run_would(models_root, tmp_path, monkeypatch, capsys):
    """Stopped in the middle of the second photo's first mask (its photo, mask and first candidate already on
    disk, unlisted; its CSV rows appended but not its list line), then --resume: byte for byte the dataset an
    uninterrupted run writes, the CSV with one row per listed composite."""
    photos, masks = user_folders(tmp_path)
    archive = models_root / "diffharmony" / "DiffHarmony"
    more = ("--rounds", "2", "--seed", "3")
    whole = tmp_path / "whole"
    assert pairs_cli.main(argv(photos, masks, whole, archive, *more)) == 0

    real_append = pairs._append

    def stop_between_csv_and_list(path, text):  # the narrowest window: after the CSV rows of pair 2
        real_append(path, text)
        if path.name.endswith("_sources.csv") and "f2_1_1.jpg" in text:
            raise KeyboardInterrupt

    monkeypatch.setattr(pairs, "_append", stop_between_csv_and_list)
    out = tmp_path / "data"
    assert pairs_cli.main(argv(photos, masks, out, archive, *more)) == 130
    monkeypatch.setattr(pairs, "_append", real_append)
    assert [s.name for s in ihd.list_split(out, "train", subsets="HFlickr")] == ["f1_1_1", "f1_1_2"]
    assert (out / "HFlickr" / "composite_images" / "f2_1_1.jpg").is_file()  # left over, unlisted
    assert len(read_sources(out)) == 4  # the stopped pair's rows made it into the CSV
    capsys.readouterr()

    with pytest.raises(InputError, match="already holds"):  # without --resume: refused, as before
        pairs.plan(photos, masks, out)
    assert pairs_cli.main(argv(photos, masks, out, archive, *more, "--resume")) == 0
    assert "written (6 listed in all)" in capsys.readouterr().out
    assert tree(out) == tree(whole)
    assert [r["composite"] for r in read_sources(out)] == [r["composite"] for r in read_sources(whole)]


def test_resume_refuses_other_settings_pairs_or_models_and_a_folder_without_a_run(written, models_root, tmp_path,
                                                                                  monkeypatch, capsys):
    photos, masks, out = written
    archive = models_root / "diffharmony" / "DiffHarmony"
    before = tree(out)
    no_model_load(monkeypatch)
    for extra, what in ((("--rounds", "3", "--seed", "7"), "settings differ"),
                        (("--rounds", "2", "--seed", "8"), "settings differ"),
                        (("--rounds", "2", "--seed", "7", "--condition-vae", str(archive / "condition_vae")),
                         "models differ")):
        assert pairs_cli.main(argv(photos, masks, out, archive, *extra, "--resume")) == 2
        assert what in capsys.readouterr().err
    save_mask(masks / "beach_2.png", 48, 40, (2, 2, 20, 20))  # one more mask: other pairs
    assert pairs_cli.main(argv(photos, masks, out, archive, "--rounds", "2", "--seed", "7", "--resume")) == 2
    assert "pairs differ" in capsys.readouterr().err
    (masks / "beach_2.png").unlink()
    assert tree(out) == before  # nothing touched
    assert pairs_cli.main(argv(photos, masks, tmp_path / "empty", archive, "--resume")) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_ctrl_c_ends_the_command_with_130_and_says_what_is_listed(models_root, tmp_path, monkeypatch, capsys):
    photos, masks = user_folders(tmp_path)
    calls = []

    def interrupted_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return make_composite(*args, **kwargs)

    monkeypatch.setattr(pairs, "make_composite", interrupted_second_time)
    out = tmp_path / "data"
    assert pairs_cli.main(argv(photos, masks, out, models_root / "diffharmony" / "DiffHarmony")) == 130
    err = capsys.readouterr().err
    assert "HFlickr_train.txt names the 1 composite(s) finished; the same command with --resume" in err
    assert err.rstrip().endswith("interrupted")
    assert [s.name for s in ihd.list_split(out, "train", subsets="HFlickr")] == ["f1_1_1"]


def test_condition_vae_decodes_the_composites(models_root, inverse_sd, tmp_path):
    from comfyui_harmonize.pipelines.diffharmony.condition_vae import load_condition_vae

    photos, masks = user_folders(tmp_path)
    (masks / "my_cat.png").unlink()
    (masks / "my_cat_left.png").unlink()
    (photos / "my_cat.png").unlink()
    archive = models_root / "diffharmony" / "DiffHarmony"
    out = tmp_path / "data"
    assert pairs_cli.main(argv(photos, masks, out, archive, "--condition-vae", str(archive / "condition_vae"))) == 0
    (s,) = ihd.list_split(out, "train", subsets="HFlickr")
    real, mask = image_io.load_image(s.real), image_io.load_mask(s.mask)
    cvae = load_condition_vae(archive / "condition_vae")
    with_cvae = make_composite(inverse_sd, real, mask, seed=0, steps=2, resolution=32, square=True, condition_vae=cvae)
    plain = make_composite(inverse_sd, real, mask, seed=0, steps=2, resolution=32, square=True)
    assert torch.equal(image_io.read_image(s.composite), jpeg_roundtrip(with_cvae))
    assert not torch.equal(jpeg_roundtrip(with_cvae), jpeg_roundtrip(plain))


def test_a_photo_cut_short_after_its_header_is_refused_before_any_work(models_root, tmp_path, capsys):
    photos, masks = user_folders(tmp_path)
    Image.open(photos / "my_cat.png").save(photos / "my_cat.jpg", quality=95)
    (photos / "my_cat.png").unlink()
    data = (photos / "my_cat.jpg").read_bytes()
    (photos / "my_cat.jpg").write_bytes(data[:-200])  # the JPEG header (size) still reads
    out = tmp_path / "data"
    assert pairs_cli.main(argv(photos, masks, out, models_root / "diffharmony" / "DiffHarmony")) == 2
    assert "cannot read photo " + str(photos / "my_cat.jpg") in capsys.readouterr().err
    assert not out.exists()  # found by the checks: nothing was written
