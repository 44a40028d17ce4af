"""Test-only references for the zero-shot stages: plain DDIM sampling, and the token embeddings before
refinement (the baselines the null-text optimisation and the embedding refinement are measured against)."""
from __future__ import annotations

import torch

from comfyui_harmonize.pipelines.describe.descriptions import Description
from comfyui_harmonize.pipelines.zero_shot.embeddings import RefinedEmbeddings, prompt_tokens
from comfyui_harmonize.pipelines.zero_shot.model import ZeroShotModel


@torch.no_grad()
def ddim_sample(model: ZeroShotModel, latent: torch.Tensor, steps: int, cond: torch.Tensor, uncond: torch.Tensor,
                guidance: float) -> torch.Tensor:
    """Plain DDIM sampling with classifier-free guidance from ``latent`` ``[1,C,h,w]``; ``cond`` / ``uncond``
    are ``[77, D]`` for every step or ``[S, 77, D]`` per step. Returns the final latent."""
    sched = model.ddim(steps)
    x = latent.float().to(model.device)
    for i, t in enumerate(sched.timesteps):
        c = cond[i] if cond.dim() == 3 else cond
        u = uncond[i] if uncond.dim() == 3 else uncond
        out = model.unet_out(torch.cat([x, x]), t, torch.stack([u, c]).to(model.device))
        eps = out[:1] + guidance * (out[1:] - out[:1])
        x = sched.step(eps, t, x).prev_sample
    return x


def unrefined_embeddings(model: ZeroShotModel, description: Description, steps: int) -> RefinedEmbeddings:
    """The same structure without optimisation (uniform alphas): the baseline the refinement improves on."""
    tokens = prompt_tokens(model, description)
    ids = torch.stack([tokens.source_ids, tokens.target_ids])
    with torch.no_grad():
        ctx = model.encode_ids(ids.to(model.device)).float().cpu()
    fg_pos, bg_pos = list(tokens.fg_positions), list(tokens.bg_positions)
    alpha = torch.full((len(bg_pos),), 1.0 / len(bg_pos))
    edited = ctx[0].clone()
    edited[fg_pos] = (ctx[1, bg_pos] * alpha[:, None]).sum(0)
    rep = lambda x: x[None].expand(steps, *x.shape).clone()  # noqa: E731
    return RefinedEmbeddings(description, tokens, rep(ctx[0]), rep(edited), rep(ctx[1]), rep(alpha), [], factor=0)
