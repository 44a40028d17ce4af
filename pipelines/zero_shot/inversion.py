"""DDIM inversion, plain DDIM sampling and null-text optimisation with the edge constraint.

DDIM inversion (guidance 0, i.e. the unconditional prediction, as the paper) runs diffusers'
``DDIMInverseScheduler`` with the model's scheduler config: it is the exact mirror of ``DDIMScheduler``,
so the S inversion steps take the clean latent to the noise level of the first sampling timestep and the S
sampling steps come back. The whole trajectory is kept: ``trajectory[0]`` is the clean latent,
``trajectory[k]`` the latent after k inversion steps (``trajectory[S]`` is where sampling starts).

Null-text optimisation (Mokady et al. 2022, as used by the paper for its edge constraint, Eq. 5-6): along
the reverse process with classifier-free guidance, the unconditional ("null-text") embedding of each step
is optimised (AdamW) so that

    loss = latent_weight * || x_{t-1} - trajectory latent ||^2  +  edge_loss(decode(x0_pred), original, mask)

where ``x0_pred`` is the step's prediction of the clean latent, decoded by the VAE, and ``edge_loss`` the
Sobel + gamma * PiDiNet edge difference inside the mask against the ORIGINAL composite
(``edges.edge_loss``; gradients flow through the VAE decoder and PiDiNet). The embedding carries over
from one step to the next. The source branch's latents of this pass are kept: they are the source branch
of the Prompt-to-Prompt edit (same latents, same embeddings).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.errors import InputError
from ..edges import loss as edges
from .model import WorkCounter, ZeroShotModel, gradients


@dataclass
class Inversion:
    """DDIM inversion of one working-size image."""

    trajectory: torch.Tensor  # [S+1, C, h, w] float32, trajectory[0] clean, trajectory[S] most noised
    timesteps: torch.Tensor  # [S] reverse (sampling) timesteps, high to low
    image: torch.Tensor  # [1, H, W, 3] the inverted image at the working size
    original: torch.Tensor  # [1, H, W, 3] the original composite at the working size (edge reference)
    mask: torch.Tensor  # [1, H, W] working-size foreground mask
    seed: int = 0

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def latent(self) -> torch.Tensor:
        return self.trajectory[-1:]


def check_steps(steps: int) -> int:
    steps = int(steps)
    if not 1 <= steps <= 1000:
        raise InputError(f"steps must be between 1 and 1000, got {steps}")
    return steps


@torch.no_grad()
def ddim_invert(model: ZeroShotModel, latent: torch.Tensor, steps: int, context: torch.Tensor | None = None,
                guidance: float = 0.0, work: WorkCounter | None = None, callback=None):
    """Invert a scaled clean latent ``[1,C,h,w]`` -> (trajectory ``[S+1,C,h,w]``, reverse timesteps ``[S]``).
    guidance 0 uses the unconditional prediction only (one UNet pass per step); otherwise classifier-free
    guidance with ``context`` (two)."""
    steps = check_steps(steps)
    inv = model.ddim_inverse(steps)
    uncond = model.empty_embedding()
    x = latent.float().to(model.device)
    traj = [x]
    with model.counting(work):
        for t in inv.timesteps:
            if guidance == 0:
                eps = model.unet_out(x, t, uncond)
            else:
                if context is None:
                    raise InputError("inversion with guidance needs a prompt embedding")
                both = model.unet_out(torch.cat([x, x]), t, torch.cat([uncond, context.to(model.device)]))
                eps = both[:1] + guidance * (both[1:] - both[:1])
            x = inv.step(eps, t, x).prev_sample
            traj.append(x)
            if callback is not None:
                callback()
    reverse = model.ddim(steps).timesteps
    return torch.cat(traj).cpu(), reverse.cpu()


@dataclass
class NullTextSettings:
    lr: float = 0.1
    iters: int = 1  # optimiser steps per reverse step: iters + step_index // growth (paper: 1 + i // 10)
    growth: int = 10  # 0: a constant ``iters`` per step
    latent_weight: float = 10.0  # official weight of the trajectory term
    edge: bool = True
    gamma: float = 0.1

    def iterations(self, step_index: int) -> int:
        extra = step_index // self.growth if self.growth > 0 else 0
        return max(0, int(self.iters) + extra)


@dataclass
class NullText:
    uncond: torch.Tensor  # [S, 77, D] optimised unconditional embedding per reverse step
    source_latents: torch.Tensor  # [S+1, C, h, w] latents of the source branch (x before each step, final)
    losses: list = field(default_factory=list)  # (step, iteration, total, latent term, edge term)


def nulltext_optimize(model: ZeroShotModel, inversion: Inversion, cond: torch.Tensor, guidance: float,
                      settings: NullTextSettings, pidinet: torch.nn.Module | None = None,
                      work: WorkCounter | None = None, callback=None) -> NullText:
    """Optimise the null-text embedding per reverse step (see the module docstring). ``cond`` is the source
    prompt's embedding ``[77, D]`` or ``[S, 77, D]`` per step (the refined embeddings)."""

    steps = inversion.steps
    device = model.device
    traj = inversion.trajectory
    sched = model.ddim(steps)
    if not torch.equal(sched.timesteps.cpu(), inversion.timesteps.cpu()):
        raise InputError("the inversion was made with another scheduler or step count")
    use_edge = settings.edge
    ref = None
    if use_edge:
        original = inversion.original.permute(0, 3, 1, 2).to(device)
        mask = (inversion.mask > 100 / 255).float().to(device)
    with model.counting(work, pidinet), gradients():
        if use_edge:
            ref = edges.reference_edges(original, pidinet if settings.gamma else None)
        u = model.empty_embedding()[0].clone().float().requires_grad_(True)
        optim = torch.optim.AdamW([u], lr=settings.lr)
        x = traj[steps:].to(device)
        uncond_steps, xs, losses = [], [x], []
        for i, t in enumerate(sched.timesteps):
            c = (cond[i] if cond.dim() == 3 else cond).to(device)
            target = traj[steps - i - 1:steps - i].to(device)
            n_iter = settings.iterations(i)
            if n_iter > 0:
                with torch.no_grad():
                    eps_c = model.unet_out(x, t, c[None])
                for k in range(n_iter):
                    eps_u = model.unet_out(x, t, u[None])
                    eps = eps_u + guidance * (eps_c - eps_u)
                    out = sched.step(eps, t, x)
                    latent_term = settings.latent_weight * F.mse_loss(out.prev_sample, target)
                    edge_term = torch.zeros((), device=device)
                    if use_edge:
                        img = model.decode(out.pred_original_sample)
                        edge_term = edges.edge_loss(img, ref, mask, pidinet if settings.gamma else None,
                                                    settings.gamma)
                    loss = latent_term + edge_term
                    optim.zero_grad(set_to_none=True)
                    loss.backward()
                    optim.step()
                    losses.append((i, k, float(loss.detach()), float(latent_term.detach()), float(edge_term.detach())))
                with torch.no_grad():
                    eps_u = model.unet_out(x, t, u.detach()[None])
            else:
                with torch.no_grad():
                    both = model.unet_out(torch.cat([x, x]), t, torch.stack([u.detach(), c]))
                    eps_u, eps_c = both[:1], both[1:]
            with torch.no_grad():
                x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
            uncond_steps.append(u.detach().clone())
            xs.append(x)
            if callback is not None:
                callback()
    return NullText(torch.stack(uncond_steps).cpu(), torch.cat(xs).cpu(), losses)
