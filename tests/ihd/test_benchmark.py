"""The benchmark command on a synthetic mini-iHarmony4: tables, resume, settings guard, distributed run."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess

import pytest
import torch

from comfyui_harmonize.commands import benchmark as bench_cli
from comfyui_harmonize.pipelines.ihd import benchmark as bm
from comfyui_harmonize.pipelines.diffharmony import pipeline as dh
from comfyui_harmonize.pipelines.ihd import dataset as ihd
from comfyui_harmonize.pipelines.evaluation import metrics
from comfyui_harmonize.pipelines.core.errors import InputError
from comfyui_harmonize.pipelines.diffharmony.refiner import load_refiner

from ihd_synthetic import make_ihd


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_ihd(tmp_path_factory.mktemp("ihd"))


def args(data, out, *extra):
    return bench_cli.parse_args(["--data", str(data), "--out", str(out), "--quiet", *extra])


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_composite_baseline_writes_the_per_subset_and_ratio_tables(data, tmp_path):
    s = bm.run(args(data, tmp_path / "run", "--method", "composite"))
    rows = read_csv(tmp_path / "run" / "per_image.csv")
    samples = ihd.list_split(data, "test")
    assert [r["name"] for r in rows] == [x.name for x in samples]  # every image, in list order
    # each row is the metrics of that image
    x = samples[5]
    d = ihd.load_sample(x)
    ref = metrics.image_metrics(d["composite"], d["real"], d["mask"])
    row = next(r for r in rows if r["name"] == x.name)
    for k in metrics.METRICS:
        assert float(row[k]) == pytest.approx(float(ref[k][0]), abs=1e-6)
    assert row["subset"] == x.subset and row["bucket"] == metrics.bucket_label(float(ref["fg_ratio"][0]))
    # per-subset table = means of the rows of that subset
    for sub in ihd.SUBSETS:
        sub_rows = [r for r in rows if r["subset"] == sub]
        e = s["by_subset"][sub]
        assert e["count"] == len(sub_rows) == 4
        assert e["fmse"] == pytest.approx(sum(float(r["fmse"]) for r in sub_rows) / 4, rel=1e-9)
    assert s["by_subset"]["all"]["count"] == 16 and s["complete"]
    assert sum(s["by_bucket"][b]["count"] for b in metrics.BUCKET_LABELS) == 16
    assert all(s["by_bucket"][b]["count"] > 0 for b in metrics.BUCKET_LABELS)  # the synthetic masks span them
    md = (tmp_path / "run" / "summary.md").read_text()
    for word in ("HCOCO PSNR↑", "HAdobe5k", "HFlickr", "Hday2night", "| all |", "| 5-15% |", "| 0-100% |",
                 "DiffHarmony 1024 + refine, paper"):
        assert word in md
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["images"] == 16


def test_interrupted_run_resumes_and_ends_with_the_same_results(data, tmp_path):
    full = tmp_path / "full"
    bm.run(args(data, full, "--method", "color_match"))
    out = tmp_path / "resumed"

    class Stop(Exception):
        pass

    seen = []

    def stop_after_five(name):
        seen.append(name)
        if len(seen) == 5:
            raise Stop

    with pytest.raises(Stop):
        bm.run(args(data, out, "--method", "color_match"), on_image=stop_after_five)
    assert len(read_csv(out / "parts" / "part-0.csv")) == 5 and not (out / "per_image.csv").exists()
    with open(out / "parts" / "part-0.csv", "a") as f:
        f.write("c0002_2_1,HCOCO,31.5")  # a record torn by a kill mid-write
    again = []
    bm.run(args(data, out, "--method", "color_match"), on_image=again.append)
    assert len(again) == 11 and not set(again) & set(seen)  # only the unfinished images ran
    assert (out / "per_image.csv").read_bytes() == (full / "per_image.csv").read_bytes()
    nothing = []
    bm.run(args(data, out, "--method", "color_match"), on_image=nothing.append)
    assert nothing == []


def test_a_folder_never_mixes_settings(data, tmp_path):
    out = tmp_path / "run"
    bm.run(args(data, out, "--method", "composite", "--subsets", "HFlickr"))
    with pytest.raises(InputError, match="other settings.*method"):
        bm.run(args(data, out, "--method", "color_match", "--subsets", "HFlickr"))
    with pytest.raises(InputError, match="metric_size"):
        bm.run(args(data, out, "--method", "composite", "--metric-size", "128"))
    assert bench_cli.main(["--data", str(tmp_path / "absent"), "--out", str(tmp_path / "x"), "--method", "composite",
                    "--quiet"]) == 2


def test_diffharmony_rows_use_name_derived_seeds(data, models_root, tmp_path):
    archive = models_root / "diffharmony" / "DiffHarmony"
    out = tmp_path / "dh"
    s = bm.run(args(data, out, "--model", str(archive), "--resolution", "32", "--steps", "2", "--limit", "1",
                    "--subsets", "HFlickr,HCOCO", "--refine-resolution", "32", "--save-images", "--seed", "7"))
    assert s["by_subset"]["all"]["count"] == 2 and "refine" in s["method"]
    settings = json.loads((out / "run.json").read_text())
    assert settings["refiner"].endswith("refinement") and settings["resolution"] == 32
    sample = ihd.list_split(data, "test", subsets="HFlickr")[0]
    row = next(r for r in read_csv(out / "per_image.csv") if r["name"] == sample.name)
    seed = ihd.name_seed(sample.name, 7)
    assert int(row["seed"]) == seed
    d = ihd.load_sample(sample)
    sd = dh.load_diffharmony(archive)
    result = dh.harmonize(sd, d["composite"], d["mask"], seed=seed, steps=2, resolution=32, square=True,
                          refiner=load_refiner(archive / "refinement"), refine_resolution=32)
    ref = metrics.image_metrics(result, d["real"], d["mask"])
    assert float(row["fmse"]) == pytest.approx(float(ref["fmse"][0]), abs=1e-5)
    saved = out / "images" / f"{sample.name}.png"
    assert saved.is_file()


def test_official_preprocessing_condition_vae_and_truncated_levels(data, models_root, tmp_path):
    """--preprocess official --decoder condition-vae --pred-levels truncate: each row measures the official
    path's 256-square result (here 32), truncated to 8 bits as the authors' to_pil_image saves it."""
    from comfyui_harmonize.pipelines.diffharmony import condition_vae as cv
    from comfyui_harmonize.pipelines.diffharmony import official

    archive = models_root / "diffharmony" / "DiffHarmony"
    out = tmp_path / "off"
    bm.run(args(data, out, "--model", str(archive), "--resolution", "32", "--steps", "1", "--limit", "1",
                "--subsets", "HFlickr", "--refine-resolution", "32", "--preprocess", "official",
                "--decoder", "condition-vae", "--pred-levels", "truncate", "--save-images"))
    settings = json.loads((out / "run.json").read_text())
    assert (settings["preprocess"], settings["decoder"], settings["pred_levels"]) == ("official", "condition-vae",
                                                                                    "truncate")
    sample = ihd.list_split(data, "test", subsets="HFlickr")[0]
    row = read_csv(out / "per_image.csv")[0]
    seed = ihd.name_seed(sample.name, 0)
    inputs = official.prepare_files(sample.composite, sample.mask, 32, 32)
    result = official.harmonize(dh.load_diffharmony(archive), inputs, seed=seed, steps=1,
                                refiner=load_refiner(archive / "refinement"), condition_vae=cv.load_condition_vae(archive))
    truncated = (result * 255).to(torch.uint8)
    assert (truncated.float() < (result * 255).round()).any()  # truncation is not rounding
    d = ihd.load_sample(sample)
    ref = metrics.image_metrics(truncated.float() / 255, d["real"], d["mask"])
    assert float(row["fmse"]) == pytest.approx(float(ref["fmse"][0]), abs=1e-5)
    from PIL import Image
    import numpy as np

    saved = np.array(Image.open(out / "images" / f"{sample.name}.png"))
    assert saved.shape == (32, 32, 3) and (saved == truncated[0].numpy()).all()
    with pytest.raises(SystemExit):
        bench_cli.parse_args(["--data", str(data), "--out", str(tmp_path / "x"), "--model", str(archive),
                       "--preprocess", "official", "--max-side", "64"])


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate launcher is not installed")
def test_two_process_accelerate_launch_writes_the_same_csv_as_one_process(data, models_root, tmp_path):
    archive = models_root / "diffharmony" / "DiffHarmony"
    common = ["--data", str(data), "--model", str(archive), "--resolution", "32", "--steps", "2", "--limit", "1",
              "--no-refine", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           "-m", "comfyui_harmonize.commands.benchmark", *common, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = sorted(p.name for p in (tmp_path / "two" / "parts").glob("*.csv"))
    assert parts == ["part-0.csv", "part-1.csv"]  # both processes did work
    assert all(len(read_csv(tmp_path / "two" / "parts" / p)) == 2 for p in parts)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bm.run(bench_cli.parse_args([*common, "--out", str(tmp_path / "one")]))
    finally:
        torch.set_num_threads(threads)
    one = (tmp_path / "one" / "per_image.csv").read_bytes()
    assert (tmp_path / "two" / "per_image.csv").read_bytes() == one
    assert one.count(b"\n") == 5


def test_console_scripts_point_at_the_commands():
    import importlib
    import tomllib
    from pathlib import Path

    scripts = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
    ours = {k: v for k, v in scripts.items() if k.startswith("harmonize-")}
    assert set(ours) == {"harmonize-benchmark", "harmonize-make-pairs", "harmonize-train-diffharmony",
                         "harmonize-train-refiner", "harmonize-train-evaluator", "harmonize-train-condition-vae"}
    for target in ours.values():
        module, func = target.split(":")
        main = getattr(importlib.import_module(module), func)
        with pytest.raises(SystemExit) as e:  # argparse: --help prints usage and exits 0
            main(["--help"])
        assert e.value.code == 0
