"""The command-line harmonizer: one image, a folder, no overwriting, clear errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_harmonize.commands import harmonize as cli
from comfyui_harmonize.pipelines.diffharmony import pipeline as dh
from comfyui_harmonize.pipelines.core import image_io
from comfyui_harmonize.pipelines.diffharmony.refiner import load_refiner
from conftest import make_composite


def write_pair(folder, name, h, w, seed):
    image, mask = make_composite(h, w, seed=seed)
    rgb = (image[0].numpy() * 255).round().astype(np.uint8)
    Image.fromarray(rgb).save(folder / f"{name}.png")
    Image.fromarray((mask[0].numpy() * 255).astype(np.uint8)).save(folder / f"{name}_mask.png")
    return torch.from_numpy(rgb.astype(np.float32) / 255)[None], mask


def test_single_image_matches_pipeline_and_never_overwrites(models_root, tmp_path):
    archive = models_root / "diffharmony" / "DiffHarmony"
    image, mask = write_pair(tmp_path, "comp", 77, 101, 1)
    out = tmp_path / "out.png"
    args = [str(archive), str(tmp_path / "comp.png"), str(tmp_path / "comp_mask.png"), "-o", str(out),
            "--resolution", "64", "--refine-resolution", "32", "--steps", "2", "--seed", "3"]
    assert cli.main(args) == 0
    got = image_io.load_image(out)
    sd = dh.load_diffharmony(archive)
    want = dh.harmonize(sd, image, mask, seed=3, steps=2, resolution=64, refiner=load_refiner(archive / "refinement"),
                        refine_resolution=32)
    assert got.shape == image.shape
    assert (got - want).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit rounding only
    first = out.read_bytes()
    assert cli.main(args) == 0
    assert out.read_bytes() == first and (tmp_path / "out_1.png").is_file()


def test_folder_mode_and_errors(models_root, tmp_path, capsys):
    archive = models_root / "diffharmony" / "DiffHarmony"
    comps, masks, outs = tmp_path / "c", tmp_path / "m", tmp_path / "o"
    comps.mkdir(), masks.mkdir()
    for i, name in enumerate(["a", "b"]):
        write_pair(tmp_path, name, 40 + i * 8, 56, i)
        (tmp_path / f"{name}.png").rename(comps / f"{name}.png")
        (tmp_path / f"{name}_mask.png").rename(masks / f"{name}_mask.png")
    assert cli.main([str(archive), str(comps), str(masks), "-o", str(outs), "--resolution", "64", "--steps", "1",
                     "--no-refine"]) == 0
    assert sorted(p.name for p in outs.iterdir()) == ["a.png", "b.png"]
    assert Image.open(outs / "b.png").size == (56, 48)
    (comps / "c.png").write_bytes((comps / "a.png").read_bytes())
    assert cli.main([str(archive), str(comps), str(masks), "-o", str(outs), "--steps", "1"]) == 2
    assert "no mask for c.png" in capsys.readouterr().err
    assert cli.main([str(tmp_path / "missing"), str(comps / "a.png"), str(masks / "a_mask.png"), "-o",
                     str(outs / "x.png")]) == 2
    assert "model not found" in capsys.readouterr().err


def test_mask_reading_luminance_or_alpha(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[2:6, 2:6] = 255
    Image.fromarray(rgb).save(tmp_path / "lum.png")
    assert image_io.load_mask(tmp_path / "lum.png")[0, 3, 3] == 1 and image_io.load_mask(tmp_path / "lum.png")[0, 0, 0] == 0
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:6, 2:6, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    m = image_io.load_mask(tmp_path / "alpha.png")
    assert m[0, 3, 3] == 1 and m[0, 0, 0] == 0


SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def test_color_match_runs_on_the_shipped_sample_without_weights(tmp_path, capsys):
    """The README's first command: no MODEL, the shipped sample, a full-size result whose background is
    the composite's, equal to the pipeline function's result (up to 8-bit rounding)."""
    from comfyui_harmonize.pipelines.color.match import harmonize_color_match

    comp, mask = SAMPLES / "harmonize_sample_cat.jpg", SAMPLES / "harmonize_sample_cat_mask.png"
    out = tmp_path / "cat.png"
    assert cli.main(["--method", "color-match", str(comp), str(mask), "-o", str(out), "--resolution", "256"]) == 0
    assert "not DiffHarmony" in capsys.readouterr().out
    image, m = image_io.load_image(comp), image_io.load_mask(mask)
    got = image_io.load_image(out)
    assert got.shape == image.shape == (1, 515, 768, 3)
    want = harmonize_color_match(image, m, resolution=256, detail="transfer")
    assert (got - want).abs().max() <= 0.5 / 255 + 1e-6
    background = m[0] == 0
    assert torch.equal(got[0][background], image[0][background])
    assert (got[0][m[0] >= 0.5] - image[0][m[0] >= 0.5]).abs().mean() > 0.02  # the cat did change


def test_color_match_takes_no_model_and_diffharmony_needs_one(tmp_path, capsys):
    comp, mask = SAMPLES / "harmonize_sample_cat.jpg", SAMPLES / "harmonize_sample_cat_mask.png"
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--method", "color-match", "model", str(comp), str(mask), "-o", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    assert "takes COMPOSITE MASK" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args([str(comp), str(mask), "-o", str(tmp_path / "x.png")])
    assert "takes MODEL COMPOSITE MASK" in capsys.readouterr().err
    args = cli.parse_args(["--method", "color-match", str(comp), str(mask), "-o", "x.png"])
    assert (args.model, args.composite, args.detail) == (None, str(comp), "transfer")
    assert cli.parse_args(["m", "c", "k", "-o", "x.png"]).detail == "resample"


def test_decoder_condition_vae_found_beside_base_and_error_when_absent(models_root, tmp_path, capsys):
    from comfyui_harmonize.pipelines.diffharmony.condition_vae import load_condition_vae

    archive = models_root / "diffharmony" / "DiffHarmony"
    image, mask = write_pair(tmp_path, "comp", 40, 48, 2)
    out = tmp_path / "out.png"
    common = [str(tmp_path / "comp.png"), str(tmp_path / "comp_mask.png"), "--resolution", "64", "--steps", "1",
              "--no-refine", "--seed", "5", "--decoder", "condition-vae"]
    assert cli.main([str(archive), *common[:2], "-o", str(out), *common[2:]]) == 0
    want = dh.harmonize(dh.load_diffharmony(archive), image, mask, seed=5, steps=1, resolution=64,
                        condition_vae=load_condition_vae(archive / "condition_vae"))
    assert (image_io.load_image(out) - want).abs().max() <= 0.5 / 255 + 1e-6
    plain = models_root / "diffusers" / "tiny-inpaint"
    assert cli.main([str(plain), *common[:2], "-o", str(tmp_path / "x.png"), *common[2:]]) == 2
    err = capsys.readouterr().err
    assert "no condition VAE found" in err and str(plain / "condition_vae") in err
    assert not (tmp_path / "x.png").exists()
