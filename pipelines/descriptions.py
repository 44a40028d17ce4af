"""Descriptions of a composite's imaging conditions (zero-shot harmonization, paper Sec. 3.1).

A description names the object, words for the foreground's imaging condition and words for the
background's. Prompts fed to Stable Diffusion put the object noun first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence


@dataclass(frozen=True)
class Description:
    object: str
    foreground: tuple[str, ...]
    background: tuple[str, ...]

    def source_prompt(self) -> str:
        """Prompt describing the composite as it is: object noun, then the foreground's condition words."""
        return " ".join((self.object, *self.foreground))

    def target_prompt(self) -> str:
        """Prompt describing the object under the background's conditions."""
        return " ".join((self.object, *self.background))

    def line(self) -> str:
        """The paper's one-line answer format."""
        return f"{self.object} & (foreground) {' '.join(self.foreground)} & (background) {' '.join(self.background)}"


@dataclass
class DescriptionSet:
    """The HARMONY_DESCRIPTIONS type: K candidates, and optionally a source that can be asked again
    (a VLM backend) when the iterative loop decides to regenerate the description."""

    candidates: list[Description]
    ask_again: Callable[[Sequence[Description]], Description | None] | None = field(default=None, repr=False)

    def regenerate(self, tried: Sequence[Description]) -> Description | None:
        """A description not in ``tried``: asks the source again when there is one, otherwise the next
        unused candidate; None when nothing new can be had."""
        if self.ask_again is not None:
            new = self.ask_again(tried)
            if new is not None and new not in tried:
                return new
        for cand in self.candidates:
            if cand not in tried:
                return cand
        return None
