"""The iterative zero-shot harmonization (paper Sec. 3.3): describe, harmonize, evaluate, repeat.

The rule (paper), with the official code's defects fixed:

- Iteration 0 harmonizes the SAME input with each of the K candidate descriptions (the official code fed
  candidate k the output of candidate k-1) and keeps the best-scoring result and its description.
- Each further iteration harmonizes the previous result again. When the score has decreased twice in a
  row (s[i] > s[i+1] > s[i+2]) the loop rolls back to state i and asks the description source for a new
  description (``DescriptionSet.regenerate``: a VLM is asked again; the official code picked a random
  pre-generated one). If the new description raises the score above s[i] the loop continues (and may
  regenerate again later); otherwise, or when no new description can be had, it concludes.
- At most ``iterations`` iterations (iteration 0 included) run. The output is the highest-scoring result
  of all (earliest on ties).

``iterate`` implements the rule on opaque states, so it is tested on scripted score sequences.

The evaluator is any callable ``score(images [B,H,W,3], masks [B,H,W]) -> tensor [B]`` (higher = more
harmonious): the trained ResNet-50 of pipelines/evaluation/evaluator.py, or the training-free
:class:`LabStatisticsScore` here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import kornia
import torch.nn.functional as F

from ..core import images
from ..describe.descriptions import Description, DescriptionSet
from ..core.errors import InputError
from .passes import ZeroShotSettings, check_inputs, full_size, harmonize_pass, pass_progress_steps, working_inputs
from .model import WorkCounter, ZeroShotModel


# ------------------------------------------------------------------------------------------ the rule
@dataclass
class Trial:
    index: int
    iteration: int
    description: Description
    parent: int | None  # index of the trial whose output was the input (None: the composite)
    score: float
    output: Any = field(repr=False, default=None)
    decision: str = ""


def iterate(start: Any, candidates: Sequence[Description], harmonize: Callable[[Any, Description], Any],
            score: Callable[[Any], float], regenerate: Callable[[Sequence[Description]], Description | None],
            iterations: int) -> tuple[list[Trial], int]:
    """Run the paper's rule. ``harmonize(state, description) -> output``; ``score(output) -> float``;
    ``regenerate(tried) -> Description | None``. Returns (all trials in order, index of the best)."""
    if iterations < 1:
        raise InputError(f"iterations must be at least 1, got {iterations}")
    if not candidates:
        raise InputError("no description to harmonize with: connect a description node with at least one candidate")
    trials: list[Trial] = []

    def run(state, desc, iteration, parent):
        out = harmonize(state, desc)
        s = float(score(out))
        if math.isnan(s):
            raise InputError("the evaluator returned NaN")
        trials.append(Trial(len(trials), iteration, desc, parent, s, out))
        return trials[-1]

    first = [run(start, d, 0, None) for d in candidates]
    current = max(first, key=lambda tr: tr.score)  # max keeps the first of equal scores
    for tr in first:
        tr.decision = "best candidate" if tr is current else "candidate"
    tried = list(candidates)
    description = current.description
    chain = [current]
    challenger_of: Trial | None = None  # after a regeneration: the state the new description must beat
    for it in range(1, iterations):
        tr = run(current.output, description, it, current.index)
        if challenger_of is not None:
            if tr.score > challenger_of.score:
                tr.decision = f"new description raised the score above #{challenger_of.index}: continue"
                challenger_of = None
            else:
                tr.decision = f"new description did not raise the score above #{challenger_of.index}: conclude"
                break
        chain.append(tr)
        current = tr
        if len(chain) >= 3 and chain[-1].score < chain[-2].score < chain[-3].score:
            back = chain[-3]
            new = regenerate(tried)
            if new is None:
                tr.decision = "score decreased twice, no new description available: conclude"
                break
            tried.append(new)
            tr.decision = f"score decreased twice: back to #{back.index}, new description '{new.line()}'"
            description, current, chain, challenger_of = new, back, [back], back
        elif not tr.decision:
            tr.decision = "continue"
    best = max(trials, key=lambda t: t.score)
    return trials, best.index


# -------------------------------------------------------------------------------- default evaluator
class LabStatisticsScore:
    """Training-free harmony score: how well the foreground's colour statistics agree with the background
    around it, in CIE Lab.

    The image is analysed at ``analysis_size`` on the long side. The reference region is a ring of
    background around the mask (``ring`` x the square root of the mask's area wide, at least 2 pixels;
    all of the background when the ring is empty). With means mu and standard deviations sigma over the
    foreground (mask-weighted) and the ring:

        d = sum_{c in L,a,b} ((mu_fg,c - mu_ring,c) / scale)^2 + (ln(sigma_fg,L / sigma_ring,L))^2
        score = exp(-d)                                       (1 = identical statistics, -> 0 as they differ)

    with ``scale`` = 20 Lab units. It rewards a foreground whose lightness, colour cast and contrast match
    its surroundings: a proxy for the global colour/illumination mismatch harmonization removes. It does
    not judge semantics (a red object on green grass is not a mismatch to fix) — the trained evaluator
    does. An image whose mask is empty or covers everything scores 1 (nothing to compare)."""

    name = "Lab statistics (training-free)"

    def __init__(self, ring: float = 0.25, scale: float = 20.0, analysis_size: int = 256):
        if ring <= 0 or scale <= 0 or analysis_size < 8:
            raise InputError("ring and scale must be > 0 and analysis_size >= 8")
        self.ring, self.scale, self.analysis_size = float(ring), float(scale), int(analysis_size)

    def __call__(self, images_bhwc: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        img, mask = images.image_and_mask(images_bhwc, masks)
        h, w = img.shape[1:3]
        scale = min(1.0, self.analysis_size / max(h, w))
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = images.resize_nchw(images.to_nchw(img), size).clamp(0, 1)
        m = images.resize_nchw(mask[:, None], size)[:, 0].clamp(0, 1)
        lab = kornia.color.rgb_to_lab(x)  # [B,3,h,w], L 0..100
        scores = []
        for b in range(img.shape[0]):
            fg = m[b]
            hard = (fg >= 0.5).float()
            area = float(hard.sum())
            if area == 0 or area == hard.numel():
                scores.append(1.0)
                continue
            r = max(2, int(round(self.ring * math.sqrt(area))))
            dil = F.max_pool2d(hard[None, None], 2 * r + 1, stride=1, padding=r)[0, 0]
            ring = dil * (1 - hard)
            if ring.sum() == 0:
                ring = 1 - hard
            mu_f, sd_f = _weighted_stats(lab[b], fg)
            mu_r, sd_r = _weighted_stats(lab[b], ring)
            d = (((mu_f - mu_r) / self.scale) ** 2).sum() + torch.log((sd_f[0] + 1e-3) / (sd_r[0] + 1e-3)) ** 2
            scores.append(float(torch.exp(-d)))
        return torch.tensor(scores, dtype=torch.float32)

    def __repr__(self) -> str:
        return f"LabStatisticsScore(ring={self.ring}, scale={self.scale})"


def _weighted_stats(lab: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    wsum = weight.sum().clamp_min(1e-8)
    mu = (lab * weight).flatten(1).sum(1) / wsum
    var = (((lab - mu[:, None, None]) ** 2) * weight).flatten(1).sum(1) / wsum
    return mu, var.clamp_min(0).sqrt()


# --------------------------------------------------------------------------------- the full system
@dataclass
class IterativeResult:
    best: torch.Tensor  # [1,H,W,3] at the composite's size
    images: torch.Tensor  # [T,H,W,3] every evaluated result in order (K candidates first)
    trials: list[Trial]
    best_index: int
    work: WorkCounter
    input_score: float

    @property
    def scores(self) -> list[float]:
        return [t.score for t in self.trials]

    def log(self) -> str:
        lines = [f"input composite: score {self.input_score:.4f}"]
        for t in self.trials:
            src = "composite" if t.parent is None else f"#{t.parent}"
            star = "  <- best" if t.index == self.best_index else ""
            lines.append(f"#{t.index} iteration {t.iteration} from {src} with '{t.description.line()}': "
                         f"score {t.score:.4f}; {t.decision}{star}")
        return "\n".join(lines)


def harmonize_iterative(model: ZeroShotModel, composite: torch.Tensor, mask: torch.Tensor,
                        descriptions: DescriptionSet, settings: ZeroShotSettings, evaluator=None,
                        pidinet: torch.nn.Module | None = None, feather: int = 0, detail: str = "resample",
                        work: WorkCounter | None = None, callback=None) -> IterativeResult:
    """The whole system for one composite ``[1,H,W,3]`` + mask ``[1,H,W]`` (full size)."""
    composite, mask = check_inputs(composite, mask)
    if composite.shape[0] != 1:
        raise InputError("harmonize_iterative takes one composite; loop over a batch")
    settings = settings.validate()
    evaluator = evaluator or LabStatisticsScore()
    work = work if work is not None else WorkCounter()
    candidates = list(descriptions.candidates)[: settings.candidates]
    original_w, mask_w = working_inputs(model, composite, mask, settings.resolution)

    def harmonize(state, description):
        # state: the working-size composite, or a previous output (working-size blend, full-size result)
        image = state[0] if isinstance(state, tuple) else state
        res = harmonize_pass(model, image, original_w, mask_w, description, settings, pidinet, work, callback)
        return res.blended, full_size(res.edited, composite, mask, feather, detail)

    def score(output):
        return float(evaluator(output[1], mask)[0])

    trials, best = iterate(original_w, candidates, harmonize, score, descriptions.regenerate, settings.iterations)
    outs = torch.cat([t.output[1] for t in trials])
    input_score = float(evaluator(composite, mask)[0])
    return IterativeResult(trials[best].output[1], outs, trials, best, work, input_score)


def progress_total(settings: ZeroShotSettings, n_candidates: int) -> int:
    """Progress ticks of the most passes the loop can make."""
    passes = min(settings.candidates, n_candidates) + settings.iterations - 1
    return passes * pass_progress_steps(settings)


def iterative_batch(model: ZeroShotModel, composite: torch.Tensor, mask: torch.Tensor, descriptions: DescriptionSet,
                    settings: ZeroShotSettings, evaluator=None, pidinet: torch.nn.Module | None = None,
                    feather: int = 0, detail: str = "resample", work: WorkCounter | None = None,
                    callback=None) -> tuple[torch.Tensor, torch.Tensor, str, list[float], list[IterativeResult]]:
    """``harmonize_iterative`` for every composite of a batch: (best results ``[B,H,W,3]``, every evaluated
    result ``[T,H,W,3]``, log, scores in the order of the results, per-composite results)."""
    composite, mask = check_inputs(composite, mask)
    results = []
    for b in range(composite.shape[0]):
        results.append(harmonize_iterative(model, composite[b:b + 1], mask[b:b + 1], descriptions, settings,
                                           evaluator, pidinet, feather, detail, work, callback))
    best = torch.cat([r.best for r in results])
    every = torch.cat([r.images for r in results])
    if len(results) == 1:
        log = results[0].log()
    else:
        log = "\n\n".join(f"composite {b}:\n{r.log()}" for b, r in enumerate(results))
    scores = [s for r in results for s in r.scores]
    return best, every, log, scores, results
