"""DiffHarmony's inverse model (inverse/): loading beside base/, the composite it makes, the node."""
from __future__ import annotations

import shutil

import pytest
import torch

import tiny_models
from comfyui_harmonize.pipelines.core.errors import WeightsError
from comfyui_harmonize.pipelines.diffharmony import inverse as inv
from comfyui_harmonize.pipelines.diffharmony import pipeline as dh
from conftest import make_composite


@pytest.fixture(scope="module")
def archive(models_root):
    return models_root / "diffharmony" / "DiffHarmony"


@pytest.fixture(scope="module")
def inverse(archive):
    return inv.load_inverse(archive)


def test_inverse_unet_from_weights_folder_other_parts_from_base(archive, inverse):
    base = dh.load_diffharmony(archive)
    want = tiny_models.tiny_unet(9, 11).state_dict()
    want["conv_out.weight"] = want["conv_out.weight"] * 3.0
    got = inverse.unet.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(got["conv_out.weight"], base.unet.state_dict()["conv_out.weight"])
    for part in ("vae", "text_encoder"):
        a, b = getattr(inverse, part).state_dict(), getattr(base, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert inverse.source.endswith("weights-1000")
    assert inv.load_inverse(archive / "inverse").source == inverse.source  # the folder itself works too


def test_inverse_as_a_pipeline_plus_a_unet(tmp_path):
    """inverse/ as "a pipeline plus a UNet": weights-<step>/ is the inverse UNet (the pipeline's own unet/ is
    the model it was trained from and is not read), the rest comes from inverse/'s pipeline, not from base/."""
    archive = tmp_path / "DiffHarmony"
    tiny_models.save_diffusers_pipeline(archive / "base", in_channels=9, seed=0)
    tiny_models.save_diffusers_pipeline(archive / "inverse", in_channels=9, seed=20)
    tiny_models.write_inverse(archive / "inverse", step=500)
    tiny_models.write_inverse(archive / "inverse", seed=12, step=2000)  # the highest step wins
    got = inv.load_inverse(archive, tokenizer_dir=None)
    assert got.source.endswith("weights-2000")
    want = tiny_models.tiny_unet(9, 12).state_dict()
    want["conv_out.weight"] = want["conv_out.weight"] * 3.0
    assert all(torch.equal(got.unet.state_dict()[k], want[k]) for k in want)
    own_vae = tiny_models.tiny_vae(21).state_dict()
    assert all(torch.equal(got.vae.state_dict()[k], own_vae[k]) for k in own_vae)
    for sub in ("weights-500", "weights-2000"):  # without weights-*: the pipeline's own unet/
        shutil.rmtree(archive / "inverse" / sub)
    plain = inv.load_inverse(archive)
    pipeline_unet = tiny_models.tiny_unet(9, 20).state_dict()
    assert all(torch.equal(plain.unet.state_dict()[k], pipeline_unet[k]) for k in pipeline_unet)


def test_make_composite_is_the_pipeline_on_the_real_photo_with_its_background_kept(inverse):
    real, mask = make_composite(48, 64, seed=8)
    got = inv.make_composite(inverse, real, mask, seed=2, steps=2, resolution=64)
    want = dh.harmonize(inverse, real, mask, seed=2, steps=2, resolution=64)
    assert torch.equal(got, want)
    inside = mask[..., None].expand_as(got) > 0.5
    assert torch.equal(got[~inside], real[~inside]) and (got - real)[inside].abs().max() > 1e-3


def test_node_makes_a_composite_that_the_harmonizer_takes(inverse, models_env, archive):
    from comfyui_harmonize.nodes import diffharmony as N

    choices = N.HarmonizeInverseLoader.INPUT_TYPES()["required"]["model"][0]
    assert choices == ["diffharmony/DiffHarmony"]
    (model,) = N.HarmonizeInverseLoader().load("diffharmony/DiffHarmony", "fp32")
    real, mask = make_composite(40, 40, seed=9)
    (comp,) = N.HarmonizeMakeComposite().make(model, real, mask, 3, 2, 64, "keep aspect")
    assert torch.equal(comp, inv.make_composite(inverse, real, mask, seed=3, steps=2, resolution=64))
    from comfyui_harmonize.pipelines.diffharmony import condition_vae as cv

    gen = cv.load_condition_vae(archive / "condition_vae")  # standing in for a cvae-gen (same layout)
    (with_cvae,) = N.HarmonizeMakeComposite().make(model, real, mask, 3, 2, 64, "keep aspect", condition_vae=gen)
    assert torch.equal(with_cvae, inv.make_composite(inverse, real, mask, seed=3, steps=2, resolution=64,
                                                     condition_vae=gen))
    assert not torch.equal(with_cvae, comp)
    (harm,) = N.HarmonizeDiffHarmony().harmonize(dh.load_diffharmony(archive), comp, mask, 0, 1, "euler_ancestral",
                                                 1.0, 64, "keep aspect", 32, 0, "resample")
    assert harm.shape == real.shape


def test_missing_inverse_and_missing_base(tmp_path, models_root):
    with pytest.raises(WeightsError, match="no inverse model found"):
        inv.load_inverse(models_root / "diffusers" / "tiny-inpaint")
    tiny_models.write_inverse(tmp_path / "lonely" / "inverse")
    with pytest.raises(WeightsError, match="no base/ pipeline"):
        inv.load_inverse(tmp_path / "lonely")
    (tmp_path / "empty" / "inverse").mkdir(parents=True)
    with pytest.raises(WeightsError, match="holds no inverse UNet"):
        inv.load_inverse(tmp_path / "empty")
