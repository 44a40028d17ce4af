"""Zero-shot harmonization, the parts: attention control, DDIM inversion + null-text optimisation with the
edge constraint, text-embedding refinement, counted work. Tiny random text-to-image model (4 channels)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from comfyui_harmonize.pipelines.edges import loss as edges
from comfyui_harmonize.pipelines.sd import models as sd_models
from comfyui_harmonize.pipelines.zero_shot import passes as zs
from comfyui_harmonize.pipelines.describe.descriptions import Description
from comfyui_harmonize.pipelines.core.errors import InputError, WeightsError
from comfyui_harmonize.pipelines.edges.pidinet import PiDiNet
from comfyui_harmonize.pipelines.zero_shot.attention import AttentionInjection, Controller, CrossAttentionStore, InjectionSchedule, attention_control, cross_attention_factors, grid_for_tokens, refinement_factor
from comfyui_harmonize.pipelines.zero_shot.embeddings import RefinementSettings, prompt_tokens, refine_embeddings
from comfyui_harmonize.pipelines.zero_shot.inversion import NullTextSettings, nulltext_optimize
from comfyui_harmonize.pipelines.zero_shot.model import WorkCounter, ZeroShotModel
from conftest import make_composite
from zero_shot_reference import ddim_sample, unrefined_embeddings

DESC = Description("girl", ("golden", "autumn"), ("winter", "dark"))
RES = 64  # working long side: a 48x64 image, 6x8 latent for the tiny model



@pytest.fixture(scope="module")
def model(models_root):
    return ZeroShotModel(sd_models.load_sd(models_root / "diffusers" / "tiny-txt2img"))


@pytest.fixture(scope="module")
def inputs(model):
    image, mask = make_composite(389, 517, seed=3)
    image_w, mask_w = zs.working_inputs(model, image, mask, RES)
    return image, mask, image_w, mask_w


@pytest.fixture(scope="module")
def inversion(model, inputs):
    _, _, image_w, mask_w = inputs
    return zs.invert(model, image_w, image_w, mask_w, steps=4, seed=1)


@pytest.fixture(scope="module")
def tiny_pidinet():
    torch.manual_seed(0)
    return PiDiNet(inplane=4, dil=4, sa=True).eval().requires_grad_(False)


PUBLISHED_PIDINET = Path(__file__).resolve().parents[3] / "shared" / "data" / "pidinet" / "table5_pidinet-tiny.pth"


@pytest.fixture(scope="module", params=["random", "published"])
def any_pidinet(request, tiny_pidinet):
    if request.param == "random":
        return tiny_pidinet
    if not PUBLISHED_PIDINET.is_file():
        pytest.skip(f"{PUBLISHED_PIDINET} is absent (../shared/data is not on this machine)")
    from comfyui_harmonize.pipelines.edges.pidinet import load_pidinet

    return load_pidinet(PUBLISHED_PIDINET)


# ------------------------------------------------------------------------------ attention control
def _unet_inputs(model, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 6, 8, generator=g)
    ctx = torch.randn(batch, 77, model.unet.config.cross_attention_dim, generator=g)
    return x, ctx


def test_empty_controller_is_bit_for_bit_the_unmodified_unet(model):
    unet = model.unet
    x, ctx = _unet_inputs(model)
    originals = dict(unet.attn_processors)
    with torch.no_grad():
        plain = unet(x, 500, encoder_hidden_states=ctx).sample
        idle = AttentionInjection((6, 8), InjectionSchedule(4, (0.0, 0.5), (0.0, 0.5)), [(1, 2)])
        idle.step = 3  # past both injection windows: the controller has nothing to do
        outs = []
        with attention_control(unet, None) as hub:
            for ctrl in (None, Controller((6, 8)), idle):
                hub.controller = ctrl
                outs.append(unet(x, 500, encoder_hidden_states=ctx).sample)
        after = unet(x, 500, encoder_hidden_states=ctx).sample
    for out in outs:
        assert torch.equal(out, plain)
    assert torch.equal(after, plain)
    assert all(unet.attn_processors[k] is v for k, v in originals.items())


def test_injection_copies_source_probabilities_only_into_edited_rows(model):
    unet = model.unet
    x, ctx = _unet_inputs(model, seed=1)
    sched = InjectionSchedule(1)
    with torch.no_grad():
        plain = unet(x, 500, encoder_hidden_states=ctx).sample
        with attention_control(unet, None) as hub:
            hub.controller = rec = AttentionInjection((6, 8), sched, [(1, 2)], record=True)
            explicit = unet(x, 500, encoder_hidden_states=ctx).sample
            hub.controller = AttentionInjection((6, 8), sched, [(1, 2)])
            fused = unet(x, 500, encoder_hidden_states=ctx).sample
    layers = {name for _, name, _, _ in rec.recorded}
    assert len(layers) == len(unet.attn_processors) == len(rec.recorded)
    for _, _, _, probs in rec.recorded:
        assert torch.equal(probs[2], probs[1])
        assert not torch.equal(probs[0], probs[1])
    # the fused-attention path (queries/keys of the source row) computes the same thing without the matrices
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)
    # rows not edited are the unmodified UNet's; the edited row is not
    assert torch.equal(fused[:2], plain[:2])
    assert (fused[2] - plain[2]).abs().max() > 1e-4


def test_p2p_full_injection_every_layer_and_step(model, inversion):
    refined = unrefined_embeddings(model, DESC, inversion.steps)
    nt = nulltext_optimize(model, inversion, refined.source, 2.5, NullTextSettings(iters=0, growth=0, edge=False))
    settings = zs.settings_for("paper", steps=inversion.steps)
    latent, ctrl = zs.p2p_edit(model, inversion, refined, nt, settings, record=True)
    n_layers = len(model.unet.attn_processors)
    assert len(ctrl.recorded) == inversion.steps * n_layers
    assert sorted({s for s, *_ in ctrl.recorded}) == list(range(inversion.steps))
    for _, _, _, probs in ctrl.recorded:
        assert torch.equal(probs[2], probs[1])
    fast, _ = zs.p2p_edit(model, inversion, refined, nt, settings)
    torch.testing.assert_close(fast, latent, rtol=1e-4, atol=1e-4)
    # without injection the edit is a different image
    none = replace(settings, cross_steps=0.0, self_end=0.0)
    free, ctrl_free = zs.p2p_edit(model, inversion, refined, nt, none, record=False)
    assert (free - fast).abs().max() > 1e-4


def test_injection_windows_resolutions_and_painterly():
    s = InjectionSchedule(10, cross=(0.0, 0.4), self_=(0.2, 1.0), cross_min_factor=1, self_min_factor=4)
    assert [s.cross_at(i, 1) for i in range(10)] == [True] * 4 + [False] * 6
    assert [s.self_at(i, 4) for i in range(10)] == [False] * 2 + [True] * 8
    assert not s.self_at(5, 2) and s.self_at(5, 8)
    painterly = zs.settings_for("paper", painterly=True)
    assert painterly.schedule().self_ == (zs.PAINTERLY_SELF_START, 1.0)
    assert not painterly.nulltext().edge and zs.settings_for("paper").nulltext().edge
    with pytest.raises(InputError):
        zs.settings_for("paper", self_min_factor=3)
    with pytest.raises(InputError):
        zs.settings_for("nope")


def test_attention_grids_and_refinement_resolution(model):
    assert grid_for_tokens(48, (6, 8)) == (1, 6, 8)
    assert grid_for_tokens(12, (6, 8)) == (2, 3, 4)
    assert grid_for_tokens(16 * 12, (64, 48)) == (4, 16, 12)
    assert grid_for_tokens(13, (6, 8)) is None
    sd = SimpleNamespace(config=SimpleNamespace(
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, mid_block_type="UNetMidBlock2DCrossAttn"))
    assert cross_attention_factors(sd) == {"down": {1, 2, 4}, "up": {1, 2, 4}, "mid": {8}}
    assert refinement_factor(sd) == 4  # 16x16 at 512 px, as the paper
    assert refinement_factor(model.unet) == 1  # the tiny model's only up/down cross-attention level


def test_store_keeps_head_averaged_cross_attention_with_gradient(model):
    x, ctx = _unet_inputs(model, batch=2, seed=2)
    ctx.requires_grad_(True)
    store = CrossAttentionStore((6, 8), factor=1)
    with attention_control(model.unet, store):
        model.unet(x, 500, encoder_hidden_states=ctx)
    maps = store.maps()
    assert maps.shape == (2, 6, 8, 77)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 6, 8))  # each position's probabilities sum to 1
    maps[..., 3].sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0


# ------------------------------------------------------------------- inversion and null-text
def test_ddim_inversion_then_sampling_reconstructs_better_with_nulltext(model, inversion):
    steps = inversion.steps
    z0 = inversion.trajectory[:1]
    uncond = model.empty_embedding()[0].cpu()
    cond = model.encode_prompts([DESC.source_prompt()])[0].cpu()
    plain = ddim_sample(model, inversion.latent, steps, cond, uncond, guidance=2.5).cpu()
    nt = nulltext_optimize(model, inversion, cond, 2.5, NullTextSettings(lr=0.3, iters=8, growth=0, edge=False))
    optimised = ddim_sample(model, inversion.latent, steps, cond, nt.uncond, guidance=2.5).cpu()
    err = lambda z: float(((z - z0) ** 2).mean())  # noqa: E731
    assert err(optimised) < 0.6 * err(plain)
    # the optimisation's own source branch is that sampling run
    torch.testing.assert_close(nt.source_latents[-1:], optimised, rtol=1e-4, atol=1e-4)
    assert nt.uncond.shape == (steps, 77, model.unet.config.cross_attention_dim)
    assert inversion.trajectory.shape == (steps + 1, 4, 6, 8)
    # every step's latent term falls while optimising that step
    for i in range(steps):
        terms = [loss[3] for loss in nt.losses if loss[0] == i]
        assert terms[-1] < terms[0]


def test_edge_term_gives_the_nulltext_embedding_gradients_through_pidinet_and_sobel(model, inversion, any_pidinet):
    pidinet = any_pidinet
    sched = model.ddim(inversion.steps)
    t = sched.timesteps[1]
    x = inversion.trajectory[inversion.steps - 1:inversion.steps]
    cond = model.encode_prompts([DESC.source_prompt()])
    original = inversion.original.permute(0, 3, 1, 2)
    ref = edges.reference_edges(original, pidinet)
    grads = {}
    for term in ("sobel", "pidinet"):
        u = model.empty_embedding()[0].clone().requires_grad_(True)
        out = model.unet_out(torch.cat([x, x]), t, torch.stack([u, cond[0]]))
        eps = out[:1] + 2.5 * (out[1:] - out[:1])
        image = model.decode(sched.step(eps, t, x).pred_original_sample)
        sobel_term, pidinet_term = edges.edge_terms(image, ref, inversion.mask, pidinet)
        (sobel_term if term == "sobel" else pidinet_term).backward()
        grads[term] = u.grad.abs().sum()
    assert grads["sobel"] > 0 and grads["pidinet"] > 0
    # and through the whole optimisation: PiDiNet runs backward once per null-text iteration
    work = WorkCounter()
    settings = NullTextSettings(iters=1, growth=0, edge=True, gamma=0.1)
    nt = nulltext_optimize(model, inversion, cond[0], 2.5, settings, pidinet, work=work)
    assert work.get("pidinet", "backward") == inversion.steps
    assert work.get("pidinet", "forward") == inversion.steps + 1  # + the reference's edges
    assert all(loss[4] > 0 for loss in nt.losses)


def test_nulltext_iterations_follow_the_paper_schedule():
    paper = zs.settings_for("paper").nulltext()
    assert [paper.iterations(i) for i in (0, 9, 10, 19, 20, 48)] == [1, 1, 2, 2, 3, 5]
    assert sum(paper.iterations(i) for i in range(49)) == 145  # the official count for 49 steps
    assert [NullTextSettings(iters=2, growth=0).iterations(i) for i in (0, 30)] == [2, 2]


# --------------------------------------------------------------------------- embedding refinement
def test_prompt_tokens_locate_multi_word_objects_and_condition_words(model):
    d = Description("girl cat", ("golden",), ("winter", "dark"))
    tok = prompt_tokens(model, d)
    word_ids = {w: model.tokenizer(w, add_special_tokens=False).input_ids for w in ("girl", "cat", "golden", "winter",
                                                                                      "dark")}
    assert tok.object_positions == (1, 2)
    assert tok.fg_positions == (3,) and tok.bg_positions == (3, 4)
    assert tok.source_ids[1:4].tolist() == word_ids["girl"] + word_ids["cat"] + word_ids["golden"]
    assert tok.target_ids[3:5].tolist() == word_ids["winter"] + word_ids["dark"]
    with pytest.raises(InputError):
        prompt_tokens(model, Description("girl", (), ("winter",)))


def test_refinement_loss_decreases_alphas_stay_a_distribution(model, inversion):
    settings = RefinementSettings(lr=0.05, iters=6, weight=0.0, factor=4, on_trajectory=True)
    ref = refine_embeddings(model, inversion.trajectory[:2], inversion.timesteps[-1:], inversion.mask[0], DESC,
                            settings)
    emb = [loss[1] for loss in ref.losses]
    assert len(emb) == 6 and emb[-1] < emb[0]
    assert ref.alphas.shape == (1, 2)
    torch.testing.assert_close(ref.alphas.sum(-1), torch.ones(1))
    assert (ref.alphas >= 0).all() and not torch.allclose(ref.alphas[0, 0], ref.alphas[0, 1])
    # the edited prompt is the source prompt with every foreground word replaced by the fused embedding
    assert ref.tokens.fg_positions == ref.tokens.bg_positions == (2, 3)
    fused = (ref.target[0, [2, 3]] * ref.alphas[0][:, None]).sum(0)
    for p in (2, 3):
        torch.testing.assert_close(ref.edited[0, p], fused)
    keep = [i for i in range(77) if i not in (2, 3)]
    assert torch.equal(ref.edited[0, keep], ref.source[0, keep])


def test_regularisation_keeps_embeddings_closer_as_the_weight_grows(model, inversion):
    dist = []
    for w in (0.0, 50.0, 5000.0):
        settings = RefinementSettings(lr=0.05, iters=3, weight=w, on_trajectory=True)
        ref = refine_embeddings(model, inversion.trajectory[:3], inversion.timesteps[-2:], inversion.mask[0], DESC,
                                settings)
        dist.append(float((ref.fg_tokens - ref.fg_tokens_init).norm() + (ref.bg_tokens - ref.bg_tokens_init).norm()))
        assert ref.source.shape[0] == 2  # one set of embeddings per step
    assert dist[0] > dist[1] > dist[2] > 0


# ------------------------------------------------------------------------------------ counted work
def expected_work(s: zs.ZeroShotSettings, n_iter_per_step, pidinet: bool) -> dict:
    """Passes of one harmonization pass, derived from the settings (see zero_shot.py's stages)."""
    S = s.steps
    nt = [n_iter_per_step(i) for i in range(S)]
    edge = s.edge and not s.painterly
    unet_fwd = (S  # inversion: unconditional only
                + S * s.refine_iters + (0 if s.refine_on_trajectory else S)  # refinement (+ advancing)
                + sum(2 + n if n else 1 for n in nt)  # null-text: cond + n optimiser steps + advance
                + S)  # P2P edit, one batched call per step
    unet_samples = (S + 2 * S * s.refine_iters + (0 if s.refine_on_trajectory else S)
                    + sum(2 + n if n else 2 for n in nt) + 3 * S)
    rows = S * s.refine_iters * 2 + sum(nt)  # refinement: both prompts; null-text: the unconditional row
    dec = sum(nt) if edge else 0
    out = {
        "unet": {"forward": unet_fwd, "samples": unet_samples, "backward": S * s.refine_iters + sum(nt),
                 "backward_samples": rows},
        "vae_encoder": {"forward": 1, "samples": 1, "backward": 0, "backward_samples": 0},
        "vae_decoder": {"forward": dec + 1, "samples": dec + 1, "backward": dec, "backward_samples": dec},
        # refinement: iters (with gradient) + 1 per step, both prompts at once
        "text_encoder": {"forward": S * (s.refine_iters + 1), "samples": 2 * S * (s.refine_iters + 1),
                         "backward": S * s.refine_iters, "backward_samples": 2 * S * s.refine_iters},
    }
    if pidinet and edge:
        out["pidinet"] = {"forward": sum(nt) + 1, "samples": sum(nt) + 1, "backward": sum(nt),
                          "backward_samples": sum(nt)}
    return out


@pytest.mark.parametrize("overrides", [
    dict(steps=3, refine_iters=2, nulltext_iters=1, nulltext_growth=2),  # paper-like (advancing, growing schedule)
    dict(steps=2, refine_iters=1, refine_on_trajectory=True, nulltext_iters=0, nulltext_growth=0, edge=False),
], ids=["paper-like", "fast-like"])
def test_pass_counts_match_the_settings_exactly(model, inputs, tiny_pidinet, overrides):
    _, _, image_w, mask_w = inputs
    s = zs.settings_for("paper", resolution=RES, **overrides)
    model.empty_embedding()  # cached: not part of a pass
    work = WorkCounter()
    ticks = []
    zs.harmonize_pass(model, image_w, image_w, mask_w, DESC, s, tiny_pidinet, work, callback=lambda: ticks.append(1))
    assert work.as_dict() == expected_work(s, s.nulltext().iterations, pidinet=True)
    assert len(ticks) == zs.pass_progress_steps(s)


def test_loader_refuses_an_inpainting_model(models_root):
    sd = sd_models.load_sd(models_root / "diffusers" / "tiny-inpaint")
    with pytest.raises(WeightsError, match="text-to-image"):
        ZeroShotModel(sd)


def test_sd_layout_refines_at_a_quarter_of_the_latent_and_injects_at_every_level(model):
    """A UNet with Stable Diffusion's four levels (narrow channels): the refinement reads the 1/4 level
    (16x16 at 512 px) and the injection reaches every level of a non-square latent."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=model.unet.config.cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
    ).eval().requires_grad_(False)
    sd4 = ZeroShotModel(replace(model.components, unet=unet))
    assert sd4.pixel_multiple == 64
    image, mask = make_composite(389, 517, seed=3)
    image_w, mask_w = zs.working_inputs(sd4, image, mask, 192)
    assert image_w.shape == (1, 128, 192, 3)  # aspect kept, sides multiples of 64
    inv = zs.invert(sd4, image_w, image_w, mask_w, steps=2, seed=0)
    ref = refine_embeddings(sd4, inv.trajectory, inv.timesteps, inv.mask[0], DESC, RefinementSettings(iters=1))
    assert ref.factor == 4 and ref.maps.shape == (2, 4, 6)  # latent 16x24 -> 4x6
    nt = nulltext_optimize(sd4, inv, ref.source, 2.5, NullTextSettings(iters=0, growth=0, edge=False))
    _, ctrl = zs.p2p_edit(sd4, inv, ref, nt, zs.settings_for("paper", steps=2), record=True)
    assert len(ctrl.recorded) == 2 * len(unet.attn_processors)
    assert sorted({p.shape[2] for *_, p in ctrl.recorded}) == [6, 24, 96, 384]  # 2x3 (mid) ... 16x24
    assert all(torch.equal(p[2], p[1]) for *_, p in ctrl.recorded)


def test_optimisation_runs_inside_no_grad_and_refuses_inference_mode_clearly(model, inversion):
    cond = model.encode_prompts([DESC.source_prompt()])[0]
    settings = NullTextSettings(iters=1, growth=0, edge=False)
    with torch.no_grad():
        nt = nulltext_optimize(model, inversion, cond, 2.5, settings)
    assert len(nt.losses) == inversion.steps
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        nulltext_optimize(model, inversion, cond, 2.5, settings)
