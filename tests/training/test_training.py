"""Training commands on tiny models and the synthetic mini-iHarmony4: the loss falls on a repeated batch,
checkpoints round-trip, and the saved models load through the pack's loaders and nodes."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from comfyui_harmonize.commands import train as train_cli
from comfyui_harmonize.nodes import diffharmony as DN
from comfyui_harmonize.nodes import evaluation as EN
from comfyui_harmonize.pipelines.diffharmony import pipeline as dh
from comfyui_harmonize.pipelines.evaluation import evaluator as ev
from comfyui_harmonize.pipelines.ihd import dataset as ihd
from comfyui_harmonize.pipelines.training import diffharmony as tdh
from comfyui_harmonize.pipelines.training import evaluator as tev
from comfyui_harmonize.pipelines.training import refiner as trf
from comfyui_harmonize.pipelines.training import common as training
from comfyui_harmonize.pipelines.core.errors import InputError
from comfyui_harmonize.pipelines.diffharmony.refiner import load_refiner

import tiny_models
from ihd_synthetic import make_ihd


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_ihd(tmp_path_factory.mktemp("ihd"), train_per_subset=1)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test builds its own Accelerator (its settings, e.g. mixed precision, are process-global)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def repeated_batch_losses(trainer, batch, n):
    return [trainer.step(batch, generator=torch.Generator().manual_seed(0)) for _ in range(n)]


# ------------------------------------------------------------------------------------------ DiffHarmony
def test_masked_loss_is_the_reference_formula():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    mask = torch.zeros(2, 1, 6, 6)
    mask[0, :, 1:3, 1:4] = 1  # 6 of 36 pixels: scale 6
    mask[1] = 1  # full mask: scale 1
    per = []
    for b, scale in ((0, 5.0), (1, 1.0)):  # clamp(36/6 = 6, 1, 5) = 5 ; 36/36 = 1
        for c in range(4):
            d = (pred[b, c] - target[b, c]) * mask[b, 0]
            per.append((d ** 2).mean() * scale)
    assert float(tdh.masked_loss(pred, target, mask)) == pytest.approx(float(torch.stack(per).mean()), rel=1e-6)


def test_diffharmony_training(data, models_root, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    pretrained = models_root / "diffusers" / "tiny-inpaint"
    out = tmp_path / "run"
    argv = ["--data", str(data), "--pretrained", str(pretrained), "--resolution", "32", "--batch-size", "2",
            "--max-steps", "2", "--save-every", "1", "--lr", "2e-3", "--ema-decay", "0.9", "--out", str(out),
            "--gradient-checkpointing"]
    args = train_cli.diffharmony_parser().parse_args(argv)
    task, dataset = tdh.build(args)
    assert len(dataset) == 8 and task.model.config.in_channels == 9
    task.save_components(out / tdh.COMPONENTS)
    trainer = training.Trainer(task, args)
    assert task.model.is_gradient_checkpointing
    batch = ihd.collate([dataset[0], dataset[3]])
    losses = repeated_batch_losses(trainer, batch, 4)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses

    # the command's loop, from fresh weights
    task, dataset = tdh.build(args)
    task.components = out / tdh.COMPONENTS
    trainer = training.Trainer(task, args)
    final = trainer.fit(dataset, collate_fn=ihd.collate)
    assert trainer.step_count == 2 and (out / "checkpoint-1" / "model" / "unet").is_dir()
    log = (out / "train_log.csv").read_text().splitlines()
    assert log[0] == "step,loss,lr" and log[-1].startswith("2,")
    # the final folder is a safetensors inpainting pipeline holding the EMA weights
    assert (final / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(final.rglob("*.bin"))
    sd = dh.load_diffharmony(final)
    trainer.ema.store(trainer.params)
    trainer.ema.copy_to(trainer.params)
    for (k, a), b in zip(sd.unet.state_dict().items(), task.model.state_dict().values()):
        assert torch.equal(a, b.cpu()), k
    trainer.ema.restore(trainer.params)
    assert sd.tokenizer("girl").input_ids == task.sd.tokenizer("girl").input_ids
    # ... and the pack's loader node finds and loads it from models/diffharmony
    models = tmp_path / "models"
    shutil.copytree(final, models / "diffharmony" / "my-diffharmony")
    monkeypatch.setenv("HARMONIZE_MODELS_DIR", str(models))
    (loaded,) = DN.HarmonizeDiffHarmonyLoader().load("diffharmony/my-diffharmony", "fp32")
    image = torch.rand(1, 40, 48, 3)
    mask = torch.zeros(1, 40, 48)
    mask[:, 10:30, 12:30] = 1
    out_img = dh.harmonize(loaded, image, mask, seed=1, steps=2, resolution=32)
    assert out_img.shape == image.shape and torch.isfinite(out_img).all()
    # never overwrite: a finished run refuses to start again in the same folder
    with pytest.raises(InputError, match="already exists"):
        trainer.fit(dataset, collate_fn=ihd.collate)

    # resuming from checkpoint-1 restores exactly what was saved, then continues
    ckpt = out / "checkpoint-1"
    assert training.latest_checkpoint(out) == ckpt
    args2 = train_cli.diffharmony_parser().parse_args([*argv[:-3], "--out", str(tmp_path / "resumed"), "--resume", str(ckpt)])
    task2, _ = tdh.build(args2)
    task2.components = out / tdh.COMPONENTS
    second = training.Trainer(task2, args2)
    second.load_checkpoint(ckpt)
    saved = load_file(str(ckpt / training.STATE_DIR / "model.safetensors"))
    for k, v in second.unwrapped.state_dict().items():
        assert torch.equal(v, saved[k]), k
    saved_opt = load_file(str(ckpt / training.STATE_DIR / "optimizer.safetensors"))
    assert torch.equal(second.optimizer.state_dict()["state"][0]["exp_avg"], saved_opt["state.0.exp_avg"])
    saved_ema = load_file(str(ckpt / training.STATE_DIR / "ema.safetensors"))
    assert torch.equal(second.ema.shadow_params[0], saved_ema["ema.0"])
    assert second.step_count == 1 and second.ema.optimization_step == 1 and second.scheduler.last_epoch == 1
    final2 = second.fit(dataset, collate_fn=ihd.collate)
    assert second.step_count == 2 and (final2 / "model_index.json").is_file()


# --------------------------------------------------------------------------------------------- refiner
SMALL_REFINER = {**tiny_models.refiner_config(7), "block_out_channels": [8, 8, 16, 16], "norm_num_groups": 4}


@pytest.fixture(scope="module")
def tiny_refiner_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(SMALL_REFINER))
    return path


def test_refiner_training_on_the_fly(data, models_root, tiny_refiner_config, tmp_path, monkeypatch):
    archive = models_root / "diffharmony" / "DiffHarmony"
    out = tmp_path / "run"
    argv = ["--data", str(data), "--diffharmony", str(archive), "--config", str(tiny_refiner_config),
            "--resolution", "32", "--refine-resolution", "16", "--gen-steps", "2", "--batch-size", "2",
            "--max-steps", "1", "--lr", "2e-3", "--out", str(out), "--gradient-checkpointing"]
    args = train_cli.refiner_parser().parse_args(argv)
    task, dataset = trf.build(args)
    trainer = training.Trainer(task, args)
    batch = ihd.collate([dataset[1], dataset[2]])
    # the generated input is the frozen DiffHarmony's output for the drawn seed
    x, target = task.inputs(batch, torch.Generator().manual_seed(0))
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(0)))
    harm = task.harmonize(batch["comp"], batch["mask"], seed)
    down = lambda t: F.interpolate(t, size=(16, 16), mode="bilinear", antialias=True,  # noqa: E731
                                   align_corners=False).clamp(-1, 1)
    assert torch.allclose(x[:, :3], down(harm), atol=1e-6) and torch.allclose(x[:, 4:], down(batch["comp"]))
    assert torch.allclose(target, down(batch["real"]))
    assert torch.equal(x[:, 3:4], (down(batch["mask"]) >= 0.5).float())
    losses = repeated_batch_losses(trainer, batch, 4)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    task, dataset = trf.build(args)
    trainer = training.Trainer(task, args)
    final = trainer.fit(dataset, collate_fn=ihd.collate)
    # the released layout: the pack's refiner loader and its node read it
    loaded = load_refiner(final)
    trainer.ema.store(trainer.params)
    trainer.ema.copy_to(trainer.params)
    probe = torch.rand(1, 7, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded(probe), task.model.eval()(probe), atol=1e-6)
    trainer.ema.restore(trainer.params)
    models = tmp_path / "models"
    shutil.copytree(final, models / "diffharmony" / "mine" / "refinement")
    monkeypatch.setenv("HARMONIZE_MODELS_DIR", str(models))
    choices = DN._refiner_choices()
    assert "diffharmony/mine/refinement" in choices
    (node_model,) = DN.HarmonizeRefinerLoader().load("diffharmony/mine/refinement", "fp32")
    assert list(node_model.config["block_out_channels"]) == SMALL_REFINER["block_out_channels"]


def test_refiner_training_from_a_cache(data, tiny_refiner_config, tmp_path):
    from PIL import Image

    cache = tmp_path / "cache"
    cache.mkdir()
    for s in ihd.list_split(data, "train"):  # a "harmonizer" that returns the composite, saved as PNG
        Image.open(s.composite).save(cache / f"{s.name}.png")
    argv = ["--data", str(data), "--cache", str(cache), "--config", str(tiny_refiner_config), "--resolution", "32",
            "--refine-resolution", "16", "--batch-size", "2", "--max-steps", "1", "--ema-decay", "0",
            "--out", str(tmp_path / "run")]
    args = train_cli.refiner_parser().parse_args(argv)
    task, dataset = trf.build(args)
    item = dataset[0]
    assert task.sd is None and item["harm"].shape == (3, 32, 32)
    x, target = task.inputs(ihd.collate([item]), None)
    assert x.shape == (1, 7, 16, 16) and target.shape == (1, 3, 16, 16)
    ref = F.interpolate(item["harm"][None], size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(x[:, :3], ref.clamp(-1, 1), atol=1e-6)
    final = training.Trainer(task, args).fit(dataset, collate_fn=ihd.collate)
    assert load_refiner(final).config["in_channels"] == 7
    (cache / f"{dataset.samples[0].name}.png").unlink()
    with pytest.raises(InputError, match="cached results are missing"):
        trf.build(args)


# ------------------------------------------------------------------------------------------- evaluator
def test_evaluator_training_with_hard_and_soft_labels(data, tmp_path, monkeypatch):
    scores = tmp_path / "scores.csv"
    train = ihd.list_split(data, "train", subsets="HCOCO")
    rel = lambda p: p.relative_to(data).as_posix()  # noqa: E731
    scores.write_text("image,mask,score\n" + "".join(
        f"{rel(s.composite)},{rel(s.mask)},0.3\n" for s in train))
    shutil.copy(scores, data / "scores.csv")
    out = tmp_path / "run"
    argv = ["--data", str(data), "--scores", str(data / "scores.csv"), "--layers", "1,1,1,1", "--base-width", "8",
            "--size", "32", "--batch-size", "4", "--max-steps", "2", "--lr", "3e-3", "--out", str(out),
            "--ema-decay", "0.9", "--gradient-checkpointing", "--mixed-precision", "bf16"]
    args = train_cli.evaluator_parser().parse_args(argv)
    task, dataset = tev.build(args)
    assert len(dataset) == 8 * 2 + len(train)
    labels = sorted({float(dataset[i]["score"]) for i in range(len(dataset))})
    assert labels == pytest.approx([0.0, 0.3, 1.0])
    trainer = training.Trainer(task, args)
    batch = ihd.collate([dataset[i] for i in (0, 1, 2, 17)])
    assert batch["x"].shape == (4, 4, 32, 32)
    losses = repeated_batch_losses(trainer, batch, 8)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    task, dataset = tev.build(args)
    trainer = training.Trainer(task, args)
    final = trainer.fit(dataset, collate_fn=ihd.collate)
    # the saved evaluator loads through the loader node and scores like the trained model's EMA weights
    models = tmp_path / "models" / "harmony_evaluator"
    models.mkdir(parents=True)
    shutil.copy(final / tev.FILE_NAME, models / "mine.safetensors")
    monkeypatch.setenv("HARMONIZE_MODELS_DIR", str(tmp_path / "models"))
    (evaluator,) = EN.HarmonizeEvaluatorLoader().load("mine.safetensors", "fp32")
    assert evaluator.size == 32
    image = torch.rand(2, 40, 40, 3)
    mask = torch.zeros(2, 40, 40)
    mask[:, 5:20, 5:25] = 1
    trainer.ema.store(trainer.params)
    trainer.ema.copy_to(trainer.params)
    trained = task.model.state_dict()
    for k, v in evaluator.model.state_dict().items():  # EMA weights + BatchNorm statistics
        assert torch.equal(v, trained[k]), k
    plain = ev.ResNet((1, 1, 1, 1), base_width=8)
    plain.load_state_dict(trained)
    with torch.no_grad():
        direct = torch.softmax(plain.eval()(ev.preprocess(image, mask, 32)), 1)[:, 1]
    assert torch.allclose(evaluator(image, mask), direct, atol=1e-6)


def test_evaluator_init_from_an_rgb_resnet(tmp_path):
    src = ev.ResNet((1, 1, 1, 1), in_channels=3, num_classes=1000, base_width=8)
    torch.save(src.state_dict(), tmp_path / "rgb.pth")
    model = tev.init_from(ev.ResNet((1, 1, 1, 1), base_width=8), tmp_path / "rgb.pth")
    w = model.conv1.weight
    assert torch.equal(w[:, :3], src.conv1.weight) and torch.count_nonzero(w[:, 3]) == 0
    assert model.fc.weight.shape == (2, 8 * 8 * 4) and torch.equal(model.layer2[0].conv2.weight,
                                                                     src.layer2[0].conv2.weight)
    with pytest.raises(Exception, match="ResNet"):
        tev.init_from(ev.ResNet((1, 2, 1, 1), base_width=8), tmp_path / "rgb.pth")
    bad = tmp_path / "bad.csv"
    bad.write_text("image,score\nx.png,1\n")
    with pytest.raises(InputError, match="image,mask,score"):
        tev.csv_items(bad)
    assert train_cli.main_evaluator(["--out", str(tmp_path / "o")]) == 2


def test_evaluator_command_runs_end_to_end(data, tmp_path, capsys):
    out = tmp_path / "cmd"
    argv = ["--data", str(data), "--layers", "1,1,1,1", "--base-width", "8", "--size", "32", "--batch-size", "4",
            "--max-steps", "2", "--out", str(out)]
    assert train_cli.main_evaluator(argv) == 0
    said = capsys.readouterr().out
    written = next(p for p in out.rglob(tev.FILE_NAME))
    assert f"harmony evaluator written to {written}" in said
    evaluator = ev.load_evaluator(written)
    assert evaluator.size == 32
    scores = evaluator(torch.rand(2, 40, 40, 3), torch.ones(2, 40, 40))
    assert scores.shape == (2,) and bool(((scores >= 0) & (scores <= 1)).all())


# -------------------------------------------------------------------------------------------- condition VAE
def test_condition_vae_objective_is_the_authors_and_training_lowers_it(data, models_root):
    """The loss is L1(decode_with_cond(sample of encode(real)), real) with the condition [comp, mask]; only
    the conditional encoder, latent_skip_conv and the decoder train; a repeated batch's loss falls."""
    from comfyui_harmonize.pipelines.diffharmony.condition_vae import ConditionVAE
    from comfyui_harmonize.pipelines.training import condition_vae as tcv

    vae = tcv.load_base_vae(models_root / "diffharmony" / "DiffHarmony")
    model = ConditionVAE.from_vae(vae)
    task = tcv.ConditionVAETask(model)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"conditional_encoder", "decoder", "latent_skip_conv"}
    samples = ihd.list_split(data, "train")[:2]
    batch = ihd.collate([ihd.PairDataset(samples, resolution=32, random_crop=False, flip=False)[i] for i in (0, 1)])
    with torch.no_grad():
        got = task.loss(model, batch, torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(3)  # the same draws, written out: encode real, sample, decode with cond
        post = model.encode(batch["real"]).latent_dist
        z = post.sample(generator=g)
        cond = torch.cat([batch["comp"], batch["mask"]], 1)
        want = F.l1_loss(model.decode_with_cond(z, cond, generator=g), batch["real"])
    assert torch.equal(got, want)
    args = train_cli.condition_vae_parser().parse_args(
        ["--data", str(data), "--vae", "x", "--out", "unused", "--lr", "1e-3", "--ema-decay", "0", "--cpu"])
    trainer = training.Trainer(task, args)
    losses = repeated_batch_losses(trainer, batch, 4)
    assert losses[-1] < losses[0]


def test_condition_vae_command_runs_end_to_end_and_its_output_decodes(data, models_root, tmp_path, capsys):
    from comfyui_harmonize.pipelines.diffharmony import condition_vae as cv

    out = tmp_path / "cvae"
    argv = ["--data", str(data), "--vae", str(models_root / "diffharmony" / "DiffHarmony"), "--resolution", "32",
            "--batch-size", "2", "--max-steps", "2", "--out", str(out)]
    assert train_cli.main_condition_vae(argv) == 0
    said = capsys.readouterr().out
    final = next(p.parent for p in out.rglob("config.json") if p.parent.name == "final")
    assert f"condition VAE written to {final}" in said
    cvae = cv.load_condition_vae(final)  # strict keys: the authors' layout
    assert json.loads((final / "config.json").read_text())["_class_name"] == "ConditionVAE"
    skip = cvae.conditional_encoder.down_block_skip_convs[0].weight
    assert skip.abs().max() > 0  # trained away from the zero start
    from conftest import make_composite

    image, mask = make_composite(32, 32, seed=1)
    (dec,) = DN.HarmonizeConditionVAEDecode().decode(cvae, {"samples": torch.randn(1, 4, 4, 4)}, image, mask, 0)
    assert dec.shape == (1, 32, 32, 3)
    assert train_cli.main_condition_vae(["--data", str(data), "--out", str(tmp_path / "x")]) == 2
    assert "give --vae" in capsys.readouterr().err
