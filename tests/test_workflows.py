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
    image, mask = write_inputs(tmp_path, 389, 517)
    results = wr.run_workflow(ROOT / "workflows" / "diffharmony.json", comfyui_harmonize.NODE_CLASS_MAPPINGS,
                              tmp_path, overrides={("HarmonizeDiffHarmonyEncode", "resolution"): 256})
    saved = dict(wr.SaveImage.saved)
    out = saved["harmonize/diffharmony"]
    assert out.shape == image.shape
    bg = mask[..., None].expand_as(image) == 0
    assert torch.equal(out[bg], image[bg])
    assert (out[~bg] - image[~bg]).abs().mean() > 1e-3
    preview = saved["preview"]
    assert preview.shape[1:3] == (192, 256)  # the decoded working-resolution image: long side 256
    assert len(results) == 12


def test_detail_and_lut_workflow_runs_node_by_node(models_env, tmp_path, monkeypatch):
    from comfyui_harmonize.pipelines.color import lut as lut_mod

    out_dir = tmp_path / "output"
    monkeypatch.setenv("HARMONIZE_OUTPUT_DIR", str(out_dir))
    image, mask = write_inputs(tmp_path, 389, 517)
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
