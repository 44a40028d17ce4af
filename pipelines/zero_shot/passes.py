"""Zero-shot image harmonization with a generative prior (Chen et al.), one harmonization pass.

A pass takes the current image (the composite, or the previous iteration's result) and a description:

1. DDIM inversion (guidance 0) of the image at the working size, keeping the trajectory
   (zero_shot_inversion.ddim_invert);
2. text-embedding refinement, Eq. 2-4 (zero_shot_embeddings.refine_embeddings): foreground words pulled
   onto the mask, background words onto the background, background words fused (alphas) into the
   replacement for each foreground-condition word;
3. null-text optimisation with the edge constraint, Eq. 5-6 (zero_shot_inversion.nulltext_optimize):
   Sobel + PiDiNet edges of the decoded x0-prediction against the ORIGINAL composite inside the mask, plus
   the pull toward the inversion trajectory;
4. Prompt-to-Prompt edit (``p2p_edit``): batch [unconditional edited, conditional source, conditional
   edited]; the conditional edited row takes the source row's cross- and self-attention probabilities
   (zero_shot_attention) while its text embedding has the fused background words; classifier-free
   guidance on the edited branch. The source branch's latents come from step 3 (they are the same
   computation), so its unconditional row is not run twice;
5. the decoded edit is blended into the original composite with the mask at the working size (the next
   iteration's input) and pasted back at the composite's own size and aspect ratio (restore.restore).

Fixes over the official code (reference/zero_shot.md): PiDiNet's edge term has a gradient; Sobel of both
images on the same range; the edge reference is the original composite; the object may be several words;
the aspect ratio and the input size are kept (working size: 512 on the long side by default).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

import torch

from ..core import images
from ..describe.descriptions import Description
from ..core.errors import InputError
from ..color.restore import check_detail, restore_unchecked
from .attention import AttentionInjection, InjectionSchedule, attention_control
from .embeddings import RefinedEmbeddings, RefinementSettings, refine_embeddings
from .inversion import Inversion, NullText, NullTextSettings, check_steps, ddim_invert, nulltext_optimize
from .model import WorkCounter, ZeroShotModel

PAINTERLY_SELF_START = 0.3  # our choice: the paper advises skipping early self-attention injection, no number


@dataclass(frozen=True)
class ZeroShotSettings:
    steps: int = 50
    guidance: float = 2.5
    resolution: int = 512  # long side of the working size
    iterations: int = 10  # iteration 0 (all candidates) included
    candidates: int = 3  # K descriptions tried at iteration 0 (at most the number given)
    refine_lr: float = 1e-3
    refine_iters: int = 2  # optimizer steps per timestep
    refine_weight: float = 5000.0  # w
    refine_on_trajectory: bool = False  # False: latents advanced with the unconditional step (official)
    refine_factor: int = 4  # attention grid = latent / 4 (16x16 at 512 px)
    nulltext_lr: float = 0.1
    nulltext_iters: int = 1  # per step: nulltext_iters + step_index // nulltext_growth
    nulltext_growth: int = 10
    nulltext_latent_weight: float = 10.0
    edge: bool = True
    edge_gamma: float = 0.1
    cross_steps: float = 1.0  # fraction of the steps with cross-attention injection
    self_start: float = 0.0  # self-attention injection from this fraction of the steps ...
    self_end: float = 1.0  # ... to this one
    cross_min_factor: int = 1  # inject at layers of 1/factor of the latent and coarser (1 = all)
    self_min_factor: int = 1
    painterly: bool = False  # no edge loss; self-attention injection skipped in the early steps
    seed: int = 8888

    def validate(self) -> "ZeroShotSettings":
        check_steps(self.steps)
        if self.iterations < 1 or self.candidates < 1:
            raise InputError("iterations and candidates must be at least 1")
        for name in ("cross_steps", "self_start", "self_end"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise InputError(f"{name} is a fraction of the steps, between 0 and 1; got {v}")
        if self.self_start > self.self_end:
            raise InputError(f"self_start ({self.self_start}) is after self_end ({self.self_end})")
        for name in ("cross_min_factor", "self_min_factor", "refine_factor"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise InputError(f"{name} must be a power of two >= 1, got {v}")
        if self.refine_iters < 0 or self.nulltext_iters < 0 or self.nulltext_growth < 0:
            raise InputError("iteration counts must be >= 0")
        return self

    # -- the parts' settings
    def refinement(self) -> RefinementSettings:
        return RefinementSettings(self.refine_lr, self.refine_iters, self.refine_weight, self.refine_factor,
                                  self.refine_on_trajectory)

    def nulltext(self) -> NullTextSettings:
        return NullTextSettings(self.nulltext_lr, self.nulltext_iters, self.nulltext_growth,
                                self.nulltext_latent_weight, self.edge and not self.painterly, self.edge_gamma)

    def schedule(self, steps: int | None = None) -> InjectionSchedule:
        start = max(self.self_start, PAINTERLY_SELF_START) if self.painterly else self.self_start
        return InjectionSchedule(steps or self.steps, (0.0, self.cross_steps), (start, max(start, self.self_end)),
                                 self.cross_min_factor, self.self_min_factor)

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


PRESETS: dict[str, ZeroShotSettings] = {
    # the paper (appendix C) and the official defaults where the paper is silent
    "paper": ZeroShotSettings(),
    # about a tenth of the UNet work per image: 20 steps, one refinement and one null-text step per timestep,
    # refinement on the inversion latents (no extra pass), 3 iterations
    "fast": ZeroShotSettings(steps=20, iterations=3, refine_iters=1, refine_on_trajectory=True, nulltext_growth=0),
    # a quick look: 10 steps, one iteration of the best of the candidates, no edge loss (no VAE backward)
    "draft": ZeroShotSettings(steps=10, iterations=1, refine_iters=1, refine_on_trajectory=True, nulltext_growth=0,
                              edge=False),
}


def settings_for(preset: str = "paper", **overrides) -> ZeroShotSettings:
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; expected one of {list(PRESETS)}")
    names = {f.name for f in fields(ZeroShotSettings)}
    bad = [k for k in overrides if k not in names]
    if bad:
        raise InputError(f"unknown settings {bad}; known: {sorted(names)}")
    return replace(PRESETS[preset], **overrides).validate()


# ------------------------------------------------------------------------------------------ stages
def working_inputs(model: ZeroShotModel, composite: torch.Tensor, mask: torch.Tensor, resolution: int):
    """Composite ``[1,H,W,3]`` and mask ``[1,H,W]`` at the working size (long side ``resolution``, aspect kept)."""
    h, w = model.working_size(composite.shape[1], composite.shape[2], resolution)
    return images.resize_images(composite, (h, w)), images.resize_masks(mask, (h, w))


def invert(model: ZeroShotModel, image: torch.Tensor, original: torch.Tensor, mask: torch.Tensor, steps: int,
           seed: int, work: WorkCounter | None = None, callback=None) -> Inversion:
    """Encode the working-size ``image`` ``[1,H,W,3]`` and DDIM-invert it (guidance 0)."""
    with model.counting(work):
        latent = model.encode_image(image, seed)
        traj, timesteps = ddim_invert(model, latent, steps, work=None, callback=callback)
    return Inversion(traj, timesteps, image.cpu(), original.cpu(), mask.cpu(), seed)


def p2p_edit(model: ZeroShotModel, inversion: Inversion, refined: RefinedEmbeddings, nulltext: NullText,
             settings: ZeroShotSettings, work: WorkCounter | None = None, callback=None,
             record: bool = False, explicit: bool = False) -> tuple[torch.Tensor, AttentionInjection]:
    """The edited branch's final latent ``[1,C,h,w]`` and the controller (``record=True`` keeps every
    attention probability matrix after injection, for inspection)."""
    steps = inversion.steps
    if refined.source.shape[0] != steps or nulltext.uncond.shape[0] != steps:
        raise InputError("inversion, embeddings and null-text optimisation were made with different step counts")
    sched = model.ddim(steps)
    device = model.device
    ctrl = AttentionInjection(tuple(inversion.trajectory.shape[-2:]), settings.schedule(steps), pairs=[(1, 2)],
                              explicit=explicit, record=record)
    g = settings.guidance
    x = inversion.trajectory[steps:].to(device)
    with torch.no_grad(), model.counting(work), attention_control(model.unet, ctrl):
        for i, t in enumerate(sched.timesteps):
            ctrl.step = i
            xs = nulltext.source_latents[i:i + 1].to(device)
            ctx = torch.stack([nulltext.uncond[i], refined.source[i], refined.edited[i]]).to(device)
            out = model.unet_out(torch.cat([x, xs, x]), t, ctx)
            eps = out[0:1] + g * (out[2:3] - out[0:1])
            x = sched.step(eps, t, x).prev_sample
            if callback is not None:
                callback()
    return x, ctrl


@dataclass
class PassResult:
    edited: torch.Tensor  # [1,H,W,3] working-size decoded edit
    blended: torch.Tensor  # [1,H,W,3] edit blended into the original composite with the mask (working size)
    description: Description
    refine_losses: list = field(default_factory=list)
    nulltext_losses: list = field(default_factory=list)
    alphas: torch.Tensor | None = None


def edit(model: ZeroShotModel, inversion: Inversion, refined: RefinedEmbeddings, settings: ZeroShotSettings,
         pidinet: torch.nn.Module | None = None, work: WorkCounter | None = None, callback=None) -> PassResult:
    """Steps 3-5 for one inverted image: null-text optimisation with the edge constraint, P2P edit, decode,
    blend at the working size."""
    with model.counting(work, pidinet):
        nt = nulltext_optimize(model, inversion, refined.source, settings.guidance, settings.nulltext(), pidinet,
                               callback=callback)
        latent, _ = p2p_edit(model, inversion, refined, nt, settings, callback=callback)
        with torch.no_grad():
            edited = images.to_nhwc(model.decode(latent)).cpu()
    blended = images.paste(edited, inversion.original, inversion.mask)
    return PassResult(edited, blended, refined.description, refined.losses, nt.losses, refined.alphas)


def harmonize_pass(model: ZeroShotModel, image: torch.Tensor, original: torch.Tensor, mask: torch.Tensor,
                   description: Description, settings: ZeroShotSettings, pidinet: torch.nn.Module | None = None,
                   work: WorkCounter | None = None, callback=None) -> PassResult:
    """One harmonization pass on working-size tensors (``image`` the current input, ``original`` the
    composite, ``mask`` ``[1,H,W]``)."""
    with model.counting(work, pidinet):
        inv = invert(model, image, original, mask, settings.steps, settings.seed, callback=callback)
        refined = refine_embeddings(model, inv.trajectory, inv.timesteps, inv.mask[0], description,
                                    settings.refinement(), callback=callback)
        return edit(model, inv, refined, settings, pidinet, callback=callback)


def pass_progress_steps(settings: ZeroShotSettings) -> int:
    """Progress ticks of one pass: inversion, refinement, null-text, edit (one per step each)."""
    return 4 * settings.steps


def full_size(edited: torch.Tensor, composite: torch.Tensor, mask: torch.Tensor, feather: int = 0,
              detail: str = "resample", cancel=None) -> torch.Tensor:
    """Paste a working-size edit into the composite (checked by :func:`check_inputs`) at its own size
    (``cancel``: see core/cancel.py; checked per strip)."""
    check_detail(detail)
    return restore_unchecked(edited, composite, mask, feather, detail, cancel=cancel)


def check_inputs(composite: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated ``[B,H,W,3]`` / ``[B,H,W]``; an empty mask is an error (nothing to harmonize)."""
    composite, mask = images.image_and_mask(composite, mask)
    images.require_foreground(mask, "zero-shot harmonization")
    return composite.contiguous(), mask.contiguous()


# ------------------------------------------------------------------------------ batches (the nodes)
@dataclass
class InversionBatch:
    """The HARMONIZE_INVERSION type: one inversion per composite of a batch, plus the full-size composite and
    mask the result is pasted back into."""

    items: list  # list[Inversion]
    composite: torch.Tensor  # [B,H,W,3] full size
    mask: torch.Tensor  # [B,H,W] full size
    settings: ZeroShotSettings

    def latents(self, model: ZeroShotModel) -> torch.Tensor:
        """The most noised latents as a ComfyUI LATENT's samples (unscaled)."""
        return torch.cat([inv.latent for inv in self.items]) / model.scaling_factor


def invert_batch(model: ZeroShotModel, composite: torch.Tensor, mask: torch.Tensor, settings: ZeroShotSettings,
                 work: WorkCounter | None = None, callback=None) -> InversionBatch:
    composite, mask = check_inputs(composite, mask)
    settings = settings.validate()
    items = []
    for b in range(composite.shape[0]):
        image_w, mask_w = working_inputs(model, composite[b:b + 1], mask[b:b + 1], settings.resolution)
        items.append(invert(model, image_w, image_w, mask_w, settings.steps, settings.seed, work, callback))
    return InversionBatch(items, composite, mask, settings)


def refine_batch(model: ZeroShotModel, inversions: InversionBatch, description: Description,
                 settings: ZeroShotSettings, work: WorkCounter | None = None, callback=None) -> list:
    settings = settings.validate()
    return [refine_embeddings(model, inv.trajectory, inv.timesteps, inv.mask[0], description, settings.refinement(),
                              work, callback) for inv in inversions.items]


def edit_batch(model: ZeroShotModel, inversions: InversionBatch, refined: list, settings: ZeroShotSettings,
               pidinet: torch.nn.Module | None = None, feather: int = 0, detail: str = "resample",
               work: WorkCounter | None = None, callback=None, cancel=None) -> tuple[torch.Tensor, list]:
    """Null-text optimisation + P2P edit of every inverted composite; returns the results pasted into the
    composites at their full size ``[B,H,W,3]`` and the per-image PassResults. ``callback`` ticks (and may
    cancel) the diffusion steps; ``cancel`` is checked inside the full-size paste."""
    settings = settings.validate()
    if len(refined) != len(inversions.items):
        raise InputError(f"{len(inversions.items)} inversions but {len(refined)} embeddings: connect the embeddings "
                         f"refined from this inversion")
    outs, results = [], []
    for b, (inv, emb) in enumerate(zip(inversions.items, refined)):
        if emb.source.shape[0] != inv.steps:
            raise InputError(f"the embeddings were refined over {emb.source.shape[0]} steps but the inversion has "
                             f"{inv.steps}: refine them from this inversion")
        res = edit(model, inv, emb, settings, pidinet, work, callback)
        results.append(res)
        outs.append(full_size(res.edited, inversions.composite[b:b + 1], inversions.mask[b:b + 1], feather, detail,
                              cancel))
    return torch.cat(outs), results


def attention_preview(refined: list, inversions: InversionBatch) -> torch.Tensor:
    """IMAGE ``[B,H,2W,3]``: the refined foreground-word attention (left) and fused background-word attention
    (right) of the last refinement step, max-normalised, at the working size."""
    tiles = []
    for emb, inv in zip(refined, inversions.items):
        h, w = inv.image.shape[1:3]
        if emb.maps is None:
            maps = torch.zeros(2, h, w)
        else:
            maps = torch.nn.functional.interpolate(emb.maps[:, None].float(), size=(h, w), mode="nearest")[:, 0]
        tiles.append(torch.cat([maps[0], maps[1]], dim=1)[None, ..., None].expand(1, h, 2 * w, 3))
    return torch.cat(tiles).clamp(0, 1).contiguous()
