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
:class:`LabStatisticsScore` of pipelines/evaluation/lab_score.py (the default).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..evaluation.lab_score import LabStatisticsScore
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
                        work: WorkCounter | None = None, callback=None, cancel=None) -> IterativeResult:
    """The whole system for one composite ``[1,H,W,3]`` + mask ``[1,H,W]`` (full size). ``callback`` ticks
    (and may cancel) the diffusion steps; ``cancel`` is checked inside each full-size paste."""
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
        return res.blended, full_size(res.edited, composite, mask, feather, detail, cancel)

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
                    callback=None, cancel=None) -> tuple[torch.Tensor, torch.Tensor, str, list[float], list[IterativeResult]]:
    """``harmonize_iterative`` for every composite of a batch: (best results ``[B,H,W,3]``, every evaluated
    result ``[T,H,W,3]``, log, scores in the order of the results, per-composite results)."""
    composite, mask = check_inputs(composite, mask)
    results = []
    for b in range(composite.shape[0]):
        results.append(harmonize_iterative(model, composite[b:b + 1], mask[b:b + 1], descriptions, settings,
                                           evaluator, pidinet, feather, detail, work, callback, cancel))
    best = torch.cat([r.best for r in results])
    every = torch.cat([r.images for r in results])
    if len(results) == 1:
        log = results[0].log()
    else:
        log = "\n\n".join(f"composite {b}:\n{r.log()}" for b, r in enumerate(results))
    scores = [s for r in results for s in r.scores]
    return best, every, log, scores, results
