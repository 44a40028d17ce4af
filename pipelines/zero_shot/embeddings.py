"""Text-embedding refinement of the zero-shot harmonization (paper Sec. 3.2, Eq. 2-4).

The source prompt is ``object + foreground-condition words`` ("girl golden autumn"), the target prompt
``object + background-condition words`` ("girl winter"). The token embeddings of the condition words are
refined so that their cross-attention covers the right region:

    L_emb(E) = || M - Att(E) / max Att(E) ||^2          (M: foreground mask for foreground words,
                                                       background mask 1 - M for background words)
    min  L_emb + w * || E - E_init ||^2                 (Eq. 3)

and the background words are fused into one embedding ``E_F = sum_n alpha_n E_n`` (alphas a softmax,
so they always sum to 1), learned through ``Att = sum_n alpha_n Att(E_n)`` (Eq. 4). Each
foreground-condition word of the source prompt is then replaced by ``E_F``: the edited prompt has the
source prompt's tokens one to one, which is what the attention injection needs.

Att is the cross-attention of the conditional branch, averaged over heads and over the up/down layers at
1/4 of the latent size (16x16 for 512 px, as the paper). As in the official code the refinement follows
the reverse diffusion and keeps one set of embeddings per reverse step, each step continuing from the
previous step's embeddings; the optimizer is AdamW. The object may be several words (tokens are located
word by word, not assumed to be one token).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..describe.descriptions import Description
from ..core.errors import InputError
from .attention import CrossAttentionStore, attention_control, refinement_factor
from .model import WorkCounter, ZeroShotModel, gradients

MASK_THRESHOLD = 100 / 255  # official binarisation of the resized mask


@dataclass(frozen=True)
class PromptTokens:
    source_ids: torch.Tensor  # [77] source prompt (object + foreground words)
    target_ids: torch.Tensor  # [77] target prompt (object + background words)
    object_positions: tuple[int, ...]
    fg_positions: tuple[int, ...]  # foreground-condition word tokens in the source prompt
    bg_positions: tuple[int, ...]  # background-condition word tokens in the target prompt


def _word_tokens(tokenizer, word: str) -> int:
    return len(tokenizer(word, add_special_tokens=False).input_ids)


def prompt_tokens(model: ZeroShotModel, description: Description) -> PromptTokens:
    """Token ids of both prompts and the positions of the object and condition words in them."""
    tok = model.tokenizer
    if not description.foreground or not description.background:
        raise InputError(
            f"the description {description.line()!r} needs at least one foreground-condition word and one "
            f"background-condition word (format: OBJECT & (foreground) W W & (background) W W)"
        )
    n_obj = sum(_word_tokens(tok, w) for w in description.object.split())
    if n_obj == 0:
        raise InputError(f"the description {description.line()!r} has no object word")

    def positions(words, prompt):
        counts = [_word_tokens(tok, w) for w in words]
        ids = tok(prompt, add_special_tokens=True).input_ids
        total = 1 + n_obj + sum(counts) + 1
        if len(ids) != total:
            raise InputError(f"could not locate the words of {prompt!r} in its tokens")
        if total > tok.model_max_length:
            raise InputError(
                f"the prompt {prompt!r} is {total} tokens long; the text encoder takes {tok.model_max_length}. "
                f"Use fewer condition words (the paper uses short prompts)."
            )
        return tuple(range(1 + n_obj, 1 + n_obj + sum(counts)))

    fg = positions(description.foreground, description.source_prompt())
    bg = positions(description.background, description.target_prompt())
    ids = model.token_ids([description.source_prompt(), description.target_prompt()])
    return PromptTokens(ids[0], ids[1], tuple(range(1, 1 + n_obj)), fg, bg)


@contextlib.contextmanager
def token_override(text_encoder, rows: dict[int, tuple[tuple[int, ...], torch.Tensor]]):
    """While active, the text encoder's token embeddings at ``rows[b] = (positions, values [n, D])`` are
    replaced by ``values`` (which may carry gradients). Uses a forward hook on the input-embedding layer,
    so the encoder itself runs unchanged."""
    emb = text_encoder.get_input_embeddings()

    def hook(module, args, output):
        out = output.clone()
        for b, (pos, values) in rows.items():
            if pos:
                out[b, list(pos)] = values.to(out.dtype)
        return out

    handle = emb.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def attention_masks(mask_hw: torch.Tensor, grid_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground / background masks at the attention grid: area-resized and binarised (> 100/255, the
    official threshold; a tiny object that vanishes keeps its covered cells)."""
    small = F.interpolate(mask_hw[None, None].float(), size=grid_hw, mode="area")[0, 0]
    fg = (small > MASK_THRESHOLD).float()
    if fg.sum() == 0:
        fg = (small > 0).float()
    return fg, 1.0 - fg


@dataclass
class RefinementSettings:
    lr: float = 1e-3
    iters: int = 2  # optimizer steps per reverse step
    weight: float = 5000.0  # w of Eq. 3
    factor: int = 4  # attention resolution: 1/factor of the latent (16x16 at 512 px)
    on_trajectory: bool = False  # True: use the inversion latents; False: advance with the unconditional step


@dataclass
class RefinedEmbeddings:
    description: Description
    tokens: PromptTokens
    source: torch.Tensor  # [S, 77, D] source prompt encoding per reverse step (refined foreground words)
    edited: torch.Tensor  # [S, 77, D] source encoding with every foreground word replaced by the fused E_F
    target: torch.Tensor  # [S, 77, D] target prompt encoding per step (refined background words)
    alphas: torch.Tensor  # [S, n_bg] fusion weights per step
    losses: list = field(default_factory=list)  # per optimizer step: (total, emb, reg)
    fg_tokens: torch.Tensor | None = None  # final refined token embeddings
    bg_tokens: torch.Tensor | None = None
    fg_tokens_init: torch.Tensor | None = None
    bg_tokens_init: torch.Tensor | None = None
    factor: int = 4
    maps: torch.Tensor | None = None  # last attention maps [2, h, w] (foreground, fused background)


def _normalised(a: torch.Tensor) -> torch.Tensor:
    return a / a.max().clamp_min(1e-12)


def refine_embeddings(model: ZeroShotModel, trajectory: torch.Tensor, timesteps, mask_hw: torch.Tensor,
                      description: Description, settings: RefinementSettings, work: WorkCounter | None = None,
                      callback=None) -> RefinedEmbeddings:
    """Refine along the reverse process. ``trajectory`` ``[S+1, C, h, w]`` are the DDIM inversion latents
    (``trajectory[0]`` the clean latent, ``trajectory[S]`` the most noised), ``timesteps`` the S reverse
    timesteps, ``mask_hw`` the working-size foreground mask."""
    steps = len(timesteps)
    if trajectory.shape[0] != steps + 1:
        raise InputError(f"the trajectory has {trajectory.shape[0]} latents; {steps} steps need {steps + 1}")
    if settings.iters < 0 or settings.lr < 0 or settings.weight < 0:
        raise InputError("refinement iterations, learning rate and weight must be >= 0")
    device = model.device
    tokens = prompt_tokens(model, description)
    ids = torch.stack([tokens.source_ids, tokens.target_ids]).to(device)
    fg_pos, bg_pos = list(tokens.fg_positions), list(tokens.bg_positions)
    factor = refinement_factor(model.unet, settings.factor)
    latent_hw = tuple(trajectory.shape[-2:])
    store = CrossAttentionStore(latent_hw, factor)
    timesteps = torch.as_tensor(timesteps)
    sched = model.ddim(steps)
    if not settings.on_trajectory and not torch.equal(sched.timesteps.cpu(), timesteps.cpu()):
        raise InputError("advancing the latents needs the full DDIM schedule: pass all the inversion's timesteps "
                         "(or refine on the trajectory)")

    with model.counting(work), attention_control(model.unet, None) as hub, gradients():
        with torch.no_grad():
            base = model.text_encoder.get_input_embeddings()(ids).float()
        fg_init = base[0, fg_pos].detach().clone()
        bg_init = base[1, bg_pos].detach().clone()
        fg = fg_init.clone().requires_grad_(True)
        bg = bg_init.clone().requires_grad_(True)
        logits = torch.zeros(len(bg_pos), device=device, requires_grad=True)
        optim = torch.optim.AdamW([fg, bg, logits], lr=settings.lr)
        uncond = model.empty_embedding()
        grid_masks = None

        def encode():
            with token_override(model.text_encoder, {0: (tuple(fg_pos), fg), 1: (tuple(bg_pos), bg)}):
                return model.encode_ids(ids).float()

        sources, editeds, targets, alphas, losses = [], [], [], [], []
        maps_last = None
        x = trajectory[steps:].to(device)
        for i, t in enumerate(timesteps):
            latent = trajectory[steps - i:steps - i + 1].to(device) if settings.on_trajectory else x
            for _ in range(settings.iters):
                ctx = encode()
                store.reset()
                hub.controller = store
                model.unet_out(latent.expand(2, -1, -1, -1), t, ctx)
                hub.controller = None
                maps = store.maps().float()  # [2, h, w, 77]
                if grid_masks is None:
                    grid_masks = attention_masks(mask_hw.to(device), maps.shape[1:3])
                m_fg, m_bg = grid_masks
                alpha = torch.softmax(logits, dim=0)
                a_fg = maps[0][..., fg_pos].sum(-1)
                a_bg = (maps[1][..., bg_pos] * alpha).sum(-1)
                loss_emb = F.mse_loss(_normalised(a_fg), m_fg) + F.mse_loss(_normalised(a_bg), m_bg)
                loss_reg = settings.weight * (F.mse_loss(fg, fg_init) + F.mse_loss(bg, bg_init))
                loss = loss_emb + loss_reg
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                losses.append((float(loss.detach()), float(loss_emb.detach()), float(loss_reg.detach())))
                maps_last = torch.stack([_normalised(a_fg), _normalised(a_bg)]).detach()
            with torch.no_grad():
                ctx = encode()
                alpha = torch.softmax(logits, dim=0)
                fused = (ctx[1, bg_pos] * alpha[:, None]).sum(0)
                edited = ctx[0].clone()
                edited[fg_pos] = fused
                sources.append(ctx[0])
                targets.append(ctx[1])
                editeds.append(edited)
                alphas.append(alpha.detach().clone())
                if not settings.on_trajectory:
                    out = model.unet_out(x, t, uncond)
                    x = sched.step(out, t, x).prev_sample
            if callback is not None:
                callback()
    return RefinedEmbeddings(
        description, tokens, torch.stack(sources).cpu(), torch.stack(editeds).cpu(), torch.stack(targets).cpu(),
        torch.stack(alphas).cpu(), losses, fg.detach().cpu(), bg.detach().cpu(), fg_init.cpu(), bg_init.cpu(),
        factor, maps_last.cpu() if maps_last is not None else None,
    )
