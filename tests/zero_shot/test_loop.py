"""Zero-shot harmonization, the system: the iteration rule on scripted scores, the training-free score, the
iterative harmonizer on a 517x389 composite, the nodes, and both shipped workflows run node by node."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import comfyui_harmonize
import workflow_runner as wr
from comfyui_harmonize.nodes import evaluation as en
from comfyui_harmonize.nodes import zero_shot as zn
from comfyui_harmonize.pipelines.sd import models as sd_models
from comfyui_harmonize.pipelines.zero_shot import passes as zs
from comfyui_harmonize.pipelines.evaluation.lab_score import LabStatisticsScore
from comfyui_harmonize.pipelines.zero_shot import loop as zl
from comfyui_harmonize.pipelines.describe.descriptions import Description, DescriptionSet
from comfyui_harmonize.pipelines.core.errors import InputError
from comfyui_harmonize.pipelines.edges.pidinet import PiDiNet
from comfyui_harmonize.pipelines.zero_shot.model import WorkCounter, ZeroShotModel
from conftest import make_composite, write_inputs

ROOT = Path(comfyui_harmonize.__file__).parent
MAPS = comfyui_harmonize.NODE_CLASS_MAPPINGS
A = Description("girl", ("golden",), ("winter",))
B = Description("girl", ("warm",), ("cold",))
C = Description("girl", ("bright",), ("dim",))
D = Description("girl", ("sunny",), ("snowy",))



# ---------------------------------------------------------------------------------- the rule
class Script:
    """harmonize/score/regenerate with scripted scores: the n-th harmonization scores scores[n]."""

    def __init__(self, scores, new=()):
        self.scores, self.new = list(scores), list(new)
        self.calls, self.asked = [], []

    def harmonize(self, state, desc):
        n = len(self.calls)
        self.calls.append((state, desc))
        return f"out{n}"

    def score(self, out):
        return self.scores[int(out[3:])]

    def regenerate(self, tried):
        self.asked.append(list(tried))
        return self.new.pop(0) if self.new else None


def run(script, candidates, iterations):
    return zl.iterate("input", candidates, script.harmonize, script.score, script.regenerate, iterations)


def test_iteration_zero_runs_every_candidate_from_the_same_input_and_keeps_the_best():
    s = Script([0.2, 0.5, 0.4, 0.6, 0.7])
    trials, best = run(s, [A, B, C], iterations=3)
    assert [c[0] for c in s.calls[:3]] == ["input"] * 3
    assert [c[1] for c in s.calls[:3]] == [A, B, C]
    assert s.calls[3] == ("out1", B) and s.calls[4] == ("out3", B)  # continues from the best, with its description
    assert [t.decision for t in trials[3:]] == ["continue", "continue"]
    assert best == 4 and len(trials) == 5 and s.asked == []


def test_two_decreases_roll_back_and_regenerate_then_continue_when_it_helps():
    #             A    B    it1  it2  it3 (new D, from #1)  it4
    s = Script([0.3, 0.6, 0.5, 0.4, 0.65, 0.66], new=[D])
    trials, best = run(s, [A, B], iterations=5)
    assert s.asked == [[A, B]]  # the description source was asked again, with what was tried
    assert s.calls[4] == ("out1", D)  # rolled back to the state before the two decreases
    assert "back to #1" in trials[3].decision and "continue" in trials[4].decision
    assert s.calls[5] == ("out4", D) and best == 5


def test_regenerated_description_that_does_not_raise_the_score_concludes():
    s = Script([0.3, 0.6, 0.5, 0.4, 0.55, 0.9], new=[D])
    trials, best = run(s, [A, B], iterations=10)
    assert len(trials) == 5 and "conclude" in trials[4].decision
    assert best == 1  # the highest score of all results


def test_no_new_description_concludes_and_ties_keep_the_earliest():
    s = Script([0.5, 0.5, 0.4, 0.3, 0.9])
    trials, best = run(s, [A, B], iterations=10)
    assert len(trials) == 4 and "conclude" in trials[3].decision and s.asked == [[A, B]]
    assert best == 0 and trials[0].decision == "best candidate"


def test_regenerate_asks_the_description_source_again():
    asked = []

    def ask_again(tried):
        asked.append(list(tried))
        return D

    descriptions = DescriptionSet([A, B, C], ask_again=ask_again)
    s = Script([0.9, 0.5, 0.4, 0.3, 0.2, 0.95])
    trials, best = zl.iterate("input", descriptions.candidates[:1], s.harmonize, s.score, descriptions.regenerate, 10)
    assert asked == [[A]] and trials[3].description == D and len(trials) == 4
    assert "conclude" in trials[3].decision and best == 0


def test_iteration_arguments_are_checked():
    with pytest.raises(InputError):
        run(Script([0.1]), [], 3)
    with pytest.raises(InputError):
        run(Script([0.1]), [A], 0)


# ---------------------------------------------------------------------------- training-free score
def test_lab_statistics_score_prefers_a_foreground_matching_its_surroundings():
    image, mask = make_composite(96, 128, seed=1)
    bg = image.clone()
    tinted = image.clone()
    tinted[..., 0] = torch.where(mask > 0.5, (tinted[..., 0] * 0.4 + 0.6), tinted[..., 0])  # a red cast on the object
    dark = torch.where(mask[..., None] > 0.5, image * 0.3, image)
    score = LabStatisticsScore()
    s = score(torch.cat([bg, tinted, dark]), mask.expand(3, -1, -1))
    assert s.shape == (3,) and bool(((s > 0) & (s <= 1)).all())
    assert s[0] > s[1] and s[0] > s[2]
    # nothing to compare: empty mask, or a mask covering the image
    assert score(image, torch.zeros(1, 96, 128)).item() == 1.0
    assert score(image, torch.ones(1, 96, 128)).item() == 1.0
    before = image.clone()
    score(image, mask)
    assert torch.equal(image, before)


# ------------------------------------------------------------------------------- the whole system
@pytest.fixture(scope="module")
def model(models_root):
    return ZeroShotModel(sd_models.load_sd(models_root / "diffusers" / "tiny-txt2img"))


def test_iterative_keeps_the_input_size_and_the_background_bytes(model):
    image, mask = make_composite(389, 517, seed=7)
    given = image.clone(), mask.clone()
    s = zs.settings_for("paper", steps=2, iterations=3, candidates=2, resolution=64, refine_iters=1)
    descriptions = DescriptionSet([A, B])
    work = WorkCounter()
    best, every, log, scores, results = zl.iterative_batch(model, image, mask, descriptions, s, work=work)
    assert torch.equal(image, given[0]) and torch.equal(mask, given[1])
    assert best.shape == (1, 389, 517, 3)
    assert every.shape[1:] == (389, 517, 3) and every.shape[0] == len(scores) == len(results[0].trials)
    bg = (mask[0] == 0)[..., None].expand(389, 517, 3)
    for out in (best[0], *every):
        assert torch.equal(out[bg], image[0][bg])
        assert (out[~bg] - image[0][~bg]).abs().mean() > 1e-3
    assert torch.equal(best[0], every[results[0].best_index])
    assert scores[results[0].best_index] == max(scores)
    # iteration 0 tried both descriptions from the composite
    assert [t.parent for t in results[0].trials[:2]] == [None, None]
    assert "iteration 0" in log and "best" in log
    passes = len(results[0].trials)
    assert work.get("vae_encoder") == passes  # one inversion per pass
    assert work.get("unet") % passes == 0


def test_same_inputs_and_seed_give_the_same_result(model):
    image, mask = make_composite(64, 80, seed=2)
    s = zs.settings_for("draft", steps=2, resolution=64, candidates=1)
    a = zl.iterative_batch(model, image, mask, DescriptionSet([A]), s)[0]
    b = zl.iterative_batch(model, image, mask, DescriptionSet([A]), s)[0]
    assert torch.equal(a, b)


def test_bad_inputs_are_refused(model):
    image, mask = make_composite(64, 80)
    s = zs.settings_for("draft", steps=2, resolution=64)
    with pytest.raises(InputError, match="selects no pixel"):
        zl.iterative_batch(model, image, torch.zeros_like(mask), DescriptionSet([A]), s)
    with pytest.raises(InputError, match="aspect"):
        zl.iterative_batch(model, image, torch.ones(1, 64, 64), DescriptionSet([A]), s)
    with pytest.raises(InputError, match="foreground-condition"):
        zl.iterative_batch(model, image, mask, DescriptionSet([Description("girl", (), ("winter",))]), s)
    with pytest.raises(InputError, match="resolution"):
        zs.working_inputs(model, image, mask, 8)


# ---------------------------------------------------------------------------------------- nodes
def write_pidinet(path: Path) -> Path:
    """A tiny random PiDiNet in the authors' checkpoint layout ({"epoch", "state_dict"}, "module." keys)."""
    torch.manual_seed(0)
    net = PiDiNet(inplane=4, dil=4, sa=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 0, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return path


@pytest.fixture
def zs_models(models_root, tmp_path, monkeypatch):
    root = tmp_path / "models"
    (root / "diffusers").mkdir(parents=True)
    (root / "diffusers" / "tiny-txt2img").symlink_to(models_root / "diffusers" / "tiny-txt2img")
    # the shipped workflows name the official default model: a tiny one stands in under that name
    (root / "diffusers" / "stable-diffusion-2-base").symlink_to(models_root / "diffusers" / "tiny-txt2img")
    write_pidinet(root / "pidinet" / "table5_pidinet-tiny.pth")
    # the shipped workflows name the published files: tiny ones stand in under those names
    import tiny_models

    model = sd_models.load_sd(models_root / "diffusers" / "tiny-txt2img")
    tiny_models.save_single_file(root / "checkpoints" / "512-base-ema.safetensors", model.unet, model.vae,
                                 model.text_encoder, "sd2")
    write_pidinet(root / "pidinet" / "table5_pidinet.pth")
    monkeypatch.setenv("HARMONIZE_MODELS_DIR", str(root))
    return root


def _result(out):
    return out["result"] if isinstance(out, dict) else out


def test_node_chain_reports_work_and_matches_the_pipeline(zs_models):
    image, mask = make_composite(72, 100, seed=5)
    assert "diffusers/tiny-txt2img" in zn.HarmonizeZeroShotLoader.INPUT_TYPES()["required"]["model"][0]
    model = zn.HarmonizeZeroShotLoader().load("diffusers/tiny-txt2img", "fp32")[0]
    settings = zn.HarmonizeZeroShotSettings().build(**{**{k: v[1]["default"] for k, v in
                                                          zn.HarmonizeZeroShotSettings.INPUT_TYPES()["required"].items()},
                                                       "steps": 2, "refine_iters": 1})[0]
    inv, latent, work1 = _result(zn.HarmonizeZeroShotInvert().invert(model, image, mask, "paper", 64, 8888, settings))
    assert latent["samples"].shape == (1, 4, 6, 8) and "unet: 2 forward" in work1
    descs = DescriptionSet([A, B])
    emb, attention, work2 = _result(zn.HarmonizeZeroShotRefine().refine(model, inv, descs, 1, "paper", settings))
    assert attention.shape == (1, 48, 128, 3) and B.line() in work2
    with pytest.raises(InputError, match="candidate 2"):
        zn.HarmonizeZeroShotRefine().refine(model, inv, descs, 2, "paper", settings)
    out, work3 = _result(zn.HarmonizeZeroShotEdit().edit(model, inv, emb, "paper", False, 0, "resample",
                                                         settings=settings))
    assert out.shape == image.shape and "vae_decoder" in work3
    # the same computation through the pipeline
    s = replace(settings, resolution=64, seed=8888)
    inv2 = zs.invert_batch(model, image, mask, s)
    emb2 = zs.refine_batch(model, inv2, B, s)
    ref, _ = zs.edit_batch(model, inv2, emb2, s)
    assert torch.equal(out, ref)
    evaluator = en.HarmonizeLabHarmonyScore().build(0.25, 20.0)[0]
    assert evaluator(out, mask).shape == (1,)


def test_loader_takes_single_file_sd1_and_sd2_checkpoints(zs_models, model):
    import tiny_models

    for family in ("sd1", "sd2"):
        tiny_models.save_single_file(zs_models / "checkpoints" / f"tiny-{family}.safetensors", model.unet, model.vae,
                                     model.text_encoder, family)
    choices = zn.HarmonizeZeroShotLoader.INPUT_TYPES()["required"]["model"][0]
    assert {"tiny-sd1.safetensors", "tiny-sd2.safetensors",
            "diffusers/stable-diffusion-2-base"} <= set(choices)
    image, mask = make_composite(48, 64, seed=9)
    s = zs.settings_for("draft", steps=2, resolution=64, candidates=1)
    outs = {}
    for name in ("diffusers/tiny-txt2img", "tiny-sd1.safetensors", "tiny-sd2.safetensors"):
        loaded = zn.HarmonizeZeroShotLoader().load(name, "fp32")[0]
        outs[name] = zl.iterative_batch(loaded, image, mask, DescriptionSet([A]), s)[0]
    assert torch.equal(outs["diffusers/tiny-txt2img"], outs["tiny-sd1.safetensors"])
    assert outs["tiny-sd2.safetensors"].shape == image.shape


@pytest.mark.parametrize("name", ["zero_shot.json", "zero_shot_iterative.json"])
def test_workflow_is_valid_and_shipped_as_a_template(name):
    text = (ROOT / "workflows" / name).read_bytes()
    wf = json.loads(text)
    wr.validate(wf, MAPS, check_files=False)
    types = {n["type"] for n in wf["nodes"]}
    assert {"LoadImage", "LoadImageMask", "SaveImage", "PreviewImage"} <= types
    mask_loader = next(n for n in wf["nodes"] if n["type"] == "LoadImageMask")
    assert mask_loader["widgets_values"][1] == "red"


def test_stage_workflow_runs_node_by_node(zs_models, tmp_path):
    image, mask = write_inputs(tmp_path)
    overrides = {("HarmonizeZeroShotInvert", "resolution"): 64}
    for node in ("HarmonizeZeroShotInvert", "HarmonizeZeroShotRefine", "HarmonizeZeroShotEdit"):
        overrides[(node, "preset")] = "fast"
    results = wr.run_workflow(ROOT / "workflows" / "zero_shot.json", MAPS, tmp_path, overrides=overrides)
    saved = dict(wr.SaveImage.saved)
    out = saved["harmonize/zero_shot"]
    assert out.shape == image.shape
    bg = mask[..., None].expand_as(image) == 0
    assert torch.equal(out[bg], image[bg])
    assert (out[~bg] - image[~bg]).abs().mean() > 1e-3
    assert saved["preview"].shape == (1, 48, 128, 3)  # attention maps at the working size, side by side
    edit_work = next(r[1] for r in results.values() if len(r) == 2 and isinstance(r[1], str) and "unet" in r[1])
    assert "pidinet" in edit_work  # the edge constraint ran through the PiDiNet of the workflow


def test_iterative_workflow_runs_node_by_node(zs_models, tmp_path):
    image, mask = write_inputs(tmp_path)
    overrides = {("HarmonizeZeroShotIterative", "resolution"): 64, ("HarmonizeZeroShotIterative", "preset"): "draft"}
    results = wr.run_workflow(ROOT / "workflows" / "zero_shot_iterative.json", MAPS, tmp_path, overrides=overrides)
    saved = dict(wr.SaveImage.saved)
    best, every = saved["harmonize/zero_shot_iterative"], saved["preview"]
    assert best.shape == image.shape and every.shape == (3, 515, 768, 3)  # draft: the 3 candidates, one iteration
    bg = mask[..., None].expand_as(image) == 0
    assert torch.equal(best[bg], image[bg])
    node = next(r for r in results.values() if len(r) == 5)
    log, scores = node[2], node[3]
    assert len(scores) == 3 and log.count("iteration 0") == 3
    assert any(torch.equal(best[0], e) for e in every)
