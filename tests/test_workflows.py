"""Every shipped workflow is valid against the node definitions and is also shipped as a template; the
DiffHarmony workflow runs node by node with tiny models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import comfyui_harmonize
import workflow_runner as wr
from conftest import write_inputs

ROOT = Path(comfyui_harmonize.__file__).parent
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


def test_there_are_workflows():
    assert "diffharmony.json" in [p.name for p in WORKFLOWS]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_node_definitions_and_has_a_template_thumbnail(path):
    wr.validate(json.loads(path.read_text()), comfyui_harmonize.NODE_CLASS_MAPPINGS, check_files=False)
    assert path.with_suffix(".jpg").is_file()  # the template browser's picture


def test_workflows_are_in_exactly_one_template_folder():
    # ComfyUI lists *.json of every one of these folders of a pack as templates: two folders = duplicates
    folders = ["example_workflows", "example", "examples", "workflow", "workflows"]
    assert [f for f in folders if (ROOT / f).is_dir()] == ["workflows"]


def test_validator_catches_broken_workflows():
    wf = json.loads((ROOT / "workflows" / "diffharmony.json").read_text())
    maps = comfyui_harmonize.NODE_CLASS_MAPPINGS

    def broken(edit):
        w = json.loads(json.dumps(wf))
        edit(w)
        with pytest.raises(wr.WorkflowError):
            wr.validate(w, maps, check_files=False)

    sampler = next(n for n in wf["nodes"] if n["type"] == "HarmonizeDiffHarmonySampler")
    i = wf["nodes"].index(sampler)
    broken(lambda w: w["nodes"][i].update(type="NoSuchNode"))
    broken(lambda w: w["nodes"][i]["widgets_values"].pop())               # widget count
    broken(lambda w: w["nodes"][i]["widgets_values"].__setitem__(3, "x"))  # scheduler not in combo
    broken(lambda w: w["nodes"][i]["widgets_values"].__setitem__(2, 0))    # steps below min
    broken(lambda w: w["links"][0].__setitem__(5, "IMAGE"))                # link type


def test_diffharmony_workflow_runs_node_by_node(models_env, tmp_path):
    image, mask = write_inputs(tmp_path)
    results = wr.run_workflow(ROOT / "workflows" / "diffharmony.json", comfyui_harmonize.NODE_CLASS_MAPPINGS,
                              tmp_path, overrides={("HarmonizeDiffHarmonyEncode", "resolution"): 256})
    saved = dict(wr.SaveImage.saved)
    out = saved["harmonize/diffharmony"]
    assert out.shape == image.shape
    bg = mask[..., None].expand_as(image) == 0
    assert torch.equal(out[bg], image[bg])
    assert (out[~bg] - image[~bg]).abs().mean() > 1e-3
    preview = saved["preview"]
    assert preview.shape[1:3] == (168, 256)  # the decoded working-resolution image: long side 256
    assert len(results) == 12


def test_detail_and_lut_workflow_runs_node_by_node(models_env, tmp_path, monkeypatch):
    from comfyui_harmonize.pipelines.color import lut as lut_mod

    out_dir = tmp_path / "output"
    monkeypatch.setenv("HARMONIZE_OUTPUT_DIR", str(out_dir))
    image, mask = write_inputs(tmp_path)
    results = wr.run_workflow(ROOT / "workflows" / "diffharmony_detail_lut.json", comfyui_harmonize.NODE_CLASS_MAPPINGS,
                              tmp_path, overrides={("HarmonizeDiffHarmony", "resolution"): 256})
    out = dict(wr.SaveImage.saved)["harmonize/diffharmony_detail"]
    assert out.shape == image.shape
    bg = mask[..., None].expand_as(image) == 0
    assert torch.equal(out[bg], image[bg])
    cubes = list(out_dir.rglob("*.cube"))
    assert len(cubes) == 1
    lut = lut_mod.read_cube(str(cubes[0]))
    assert lut.size == 33 and torch.isfinite(lut.table).all()
    assert len(results) == 9


# One downloadable file per model a shipped workflow names: the loader, its widget value, and where it goes.
PUBLISHED_MODELS = {
    "HarmonizeZeroShotLoader": ("512-base-ema.safetensors", "checkpoints",
                                "https://huggingface.co/stabilityai/stable-diffusion-2-base/resolve/main/"),
    "HarmonizePiDiNetLoader": ("table5_pidinet.pth", "pidinet",
                               "https://huggingface.co/lllyasviel/Annotators/resolve/main/"),
}


def _pack_id_and_version() -> tuple[str, str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["name"], project["version"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_node_names_its_pack_and_every_model_its_download(path):
    """cnr_id/ver tell the front end and ComfyUI-Manager which pack provides a node a user lacks; a models
    entry whose name is the loader's widget value puts a missing file in the front end's missing-models
    dialog with its download."""
    import re

    pack = _pack_id_and_version()
    wf = json.loads(path.read_text())
    for node in wf["nodes"]:
        props = node["properties"]
        where = f"{path.name} node {node['id']} ({node['type']})"
        if node["type"].startswith("Harmonize"):
            assert (props.get("cnr_id"), props.get("ver")) == pack, where
        else:
            assert props.get("cnr_id") == "comfy-core", where
            assert re.fullmatch(r"\d+\.\d+\.\d+", props.get("ver", "")), where
        values = [v for v in node.get("widgets_values") or [] if isinstance(v, str)]
        for model in props.get("models", []):
            assert set(model) >= {"name", "url", "directory"}, where
            assert model["name"] in values, f"{where}: models entry {model['name']} is no widget value {values}"
            assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith("/" + model["name"])
        if node["type"] in PUBLISHED_MODELS:
            name, directory, url = PUBLISHED_MODELS[node["type"]]
            assert values[0] == name, f"{where}: the loader should name the published file {name}"
            assert props.get("models") == [{"name": name, "url": url + name, "directory": directory}], where


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflows_load_the_shipped_sample(path):
    wf = json.loads(path.read_text())
    loaded = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] in ("LoadImage", "LoadImageMask")]
    assert loaded, path.name
    assert all((ROOT / "samples" / name).is_file() for name in loaded), loaded


def test_published_model_files_are_what_the_loaders_read(models_root, tmp_path, monkeypatch):
    """Files saved under the published names in the folders of the models entries are listed by the loaders
    under exactly those names, as their defaults, and load (the dialog's download lands where the loader
    looks)."""
    import tiny_models
    from comfyui_harmonize.nodes.edges import HarmonizePiDiNetLoader
    from comfyui_harmonize.nodes.zero_shot import HarmonizeZeroShotLoader
    from comfyui_harmonize.pipelines.edges.pidinet import PiDiNet
    from comfyui_harmonize.pipelines.sd.models import load_sd

    sd = load_sd(models_root / "diffusers" / "tiny-txt2img")
    tiny_models.save_single_file(tmp_path / "checkpoints" / "512-base-ema.safetensors", sd.unet, sd.vae,
                                 sd.text_encoder, "sd2")
    (tmp_path / "pidinet").mkdir()
    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in PiDiNet(inplane=4, dil=4, sa=True).state_dict().items()}
    torch.save({"epoch": 0, "state_dict": state}, tmp_path / "pidinet" / "table5_pidinet.pth")
    monkeypatch.setenv("HARMONIZE_MODELS_DIR", str(tmp_path))
    for cls, key in ((HarmonizeZeroShotLoader, "model"), (HarmonizePiDiNetLoader, "pidinet_name")):
        name, directory, _ = PUBLISHED_MODELS[cls.__name__]
        spec = cls.INPUT_TYPES()["required"][key]
        assert name in spec[0] and spec[1]["default"] == name, spec
    model = HarmonizeZeroShotLoader().load("512-base-ema.safetensors", "fp32")[0]
    assert model.components.unet.config.in_channels == 4
    assert isinstance(HarmonizePiDiNetLoader().load("table5_pidinet.pth")[0], PiDiNet)


def test_condition_vae_workflow_runs_node_by_node(models_env, tmp_path):
    """The archive's condition_vae/ in a graph: encoded with its encoder, decoded with [composite, mask]."""
    from comfyui_harmonize.pipelines.diffharmony import condition_vae as cv
    from comfyui_harmonize.pipelines.diffharmony import pipeline as dh

    image, mask = write_inputs(tmp_path)
    results = wr.run_workflow(ROOT / "workflows" / "diffharmony_condition_vae.json",
                              comfyui_harmonize.NODE_CLASS_MAPPINGS, tmp_path,
                              overrides={("HarmonizeDiffHarmonyEncode", "resolution"): 256})
    saved = dict(wr.SaveImage.saved)
    out = saved["harmonize/diffharmony_condition_vae"]
    assert out.shape == image.shape and len(results) == 11
    bg = mask[..., None].expand_as(image) == 0
    assert torch.equal(out[bg], image[bg])
    archive = models_env / "diffharmony" / "DiffHarmony"
    sd, cvae = dh.load_diffharmony(archive), cv.load_condition_vae(archive)
    want = dh.harmonize(sd, image, mask, seed=0, steps=5, resolution=256, condition_vae=cvae)  # the all-in-one path
    assert torch.allclose(out, want, atol=1e-6)


def test_inverse_workflow_runs_node_by_node(models_env, tmp_path):
    """The archive's inverse/ in a graph: a training composite made from the photo, then harmonized back."""
    from comfyui_harmonize.pipelines.diffharmony import inverse as inv

    image, mask = write_inputs(tmp_path)
    results = wr.run_workflow(ROOT / "workflows" / "diffharmony_inverse.json", comfyui_harmonize.NODE_CLASS_MAPPINGS,
                              tmp_path, overrides={("HarmonizeMakeComposite", "resolution"): 256,
                                                   ("HarmonizeDiffHarmony", "resolution"): 256})
    saved = dict(wr.SaveImage.saved)
    made, back = saved["harmonize/training_composite"], saved["preview"]
    assert len(results) == 8 and made.shape == back.shape == image.shape
    sd = inv.load_inverse(models_env / "diffharmony" / "DiffHarmony")
    assert torch.equal(made, inv.make_composite(sd, image, mask, seed=0, steps=5, resolution=256))
    bg = mask[..., None].expand_as(image) == 0
    assert torch.equal(made[bg], image[bg]) and torch.equal(back[bg], image[bg])
    assert (made[~bg] - image[~bg]).abs().mean() > 1e-3
