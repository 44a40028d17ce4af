"""Descriptions of a composite's imaging conditions (zero-shot harmonization, paper Sec. 3.1 and
appendix B).

A description names the object, words for the foreground's imaging condition and words for the
background's, drawn from a fixed vocabulary. Prompts fed to Stable Diffusion put the object noun first.

``parse_descriptions`` reads the paper's one-line answer format
``OBJECT & (foreground) W W ... & (background) W W ...`` (one candidate per line), as written by a
vision-language model or by hand. It tolerates the ways models and people decorate that format
(case, spacing, punctuation, bullets, numbering, markdown, ``foreground:`` instead of
``(foreground)``) but keeps only vocabulary words and rejects lines without an object or without a word
on each side.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Sequence

from ..core.errors import InputError

# The vocabulary dictionary of the paper (appendix B): the answer must draw its condition words from it.
VOCABULARY: dict[str, tuple[str, ...]] = {
    "brightness": ("dazzling", "bright", "dim", "dull", "shaded", "shadowed"),
    "weather": ("cloudy", "sunny", "rainy", "snowy", "foggy", "windy", "stormy", "clear", "misty"),
    "temperature": ("hot", "warm", "cool", "cold", "icy"),
    "season": ("spring", "summer", "autumn", "winter"),
    "time": ("dawn", "sunrise", "daylight", "twilight", "sunset", "dusk", "dark", "night"),
    "color tone": ("greyscale", "neon", "golden", "white", "blue", "green", "yellow", "orange", "red", "earthy"),
    "environment": ("city", "rural", "lake", "ocean", "mountain", "forest", "desert", "grassland", "sky",
                    "space", "indoor", "street"),
}
VOCABULARY_WORDS: frozenset[str] = frozenset(w for words in VOCABULARY.values() for w in words)

# Spelling variants read as the vocabulary word (the vocabulary uses British "greyscale").
ALIASES: dict[str, str] = {"grayscale": "greyscale"}

FORMAT = "OBJECT & (foreground) WORD WORD ... & (background) WORD WORD ..."
EXAMPLE = "dog & (foreground) bright summer & (background) winter dull greyscale"
MAX_WORDS_PER_SIDE = 8  # prompts stay short (paper, appendix D); extra words are reported as dropped
MAX_OBJECT_WORDS = 5  # an object name is a short noun phrase ("dog", "teddy bear"), not a sentence
QUOTE_LIMIT = 600  # characters of a bad text quoted in an error message


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

    def key(self) -> tuple[str, frozenset[str], frozenset[str]]:
        """Identity used to deduplicate candidates: the same object and the same word sets (word order
        aside) describe the same conditions."""
        return self.object, frozenset(self.foreground), frozenset(self.background)


@dataclass
class DescriptionSet:
    """The HARMONIZE_DESCRIPTIONS type: K candidates, and optionally a source that can be asked again
    (a VLM backend) when the iterative loop decides to regenerate the description.

    ``raw`` is the text the candidates were read from (a model's answers, or the user's text) and
    ``dropped`` the words that were left out because they are not in the vocabulary."""

    candidates: list[Description]
    ask_again: Callable[[Sequence[Description]], Description | None] | None = field(default=None, repr=False)
    raw: str = ""
    dropped: tuple[str, ...] = ()

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

    def lines(self) -> str:
        """The candidates in the paper's format, one per line."""
        return "\n".join(c.line() for c in self.candidates)


# ------------------------------------------------------------------------------------------- parsing
def quote(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` as a JSON string literal for an error message; a long text keeps its start and end."""
    if len(text) > limit:
        head, tail = text[: limit * 3 // 4], text[-(limit // 4):]
        return f"{json.dumps(head, ensure_ascii=False)} ... [{len(text) - len(head) - len(tail)} characters omitted] ... {json.dumps(tail, ensure_ascii=False)}"
    return json.dumps(text, ensure_ascii=False)


_MARKER_WORD = re.compile(r"\b(fore|back)[ \t-]?ground\b", re.IGNORECASE)
_OPEN, _CLOSE = "([{<", ")]}>"
_SEPARATORS = "&|;,/+"
_AFTER_MARKER = ":=-\u2013\u2014"
# bullets ("-", "*", "•"), numbering ("1.", "2)", "(3)", "[4]"), headings and quotes at a line's start
_LEAD = re.compile(r"^\s*(?:[-*+\u2022\u00b7>#]+|\(?\[?\d{1,3}\s*[.):\]]+)\s*")
_MARKUP = re.compile(r"[`*~\"\u201c\u201d\u2018\u2019]|_{2,}")
_WORDS = re.compile(r"[^\W\d_]+")


def _markers(line: str) -> list[tuple[str, int, int]]:
    """Side markers in a line: ("fore"|"back", start, end) where [start, end) covers the marker with its
    brackets and a following colon. A bare word counts only where it stands as a label (bracketed,
    followed by a colon, or after a separator) so that prose such as "the foreground is bright" is no
    marker."""
    found = []
    for m in _MARKER_WORD.finditer(line):
        start, end = m.span()
        left = line[:start].rstrip()
        right = line[end:].lstrip()
        bracketed = bool(left) and left[-1] in _OPEN and bool(right) and right[0] == _CLOSE[_OPEN.index(left[-1])]
        labelled = bool(right) and right[0] in _AFTER_MARKER
        separated = not left or left[-1] in _SEPARATORS
        if not (bracketed or labelled or separated):
            continue
        if bracketed:
            start = len(left) - 1
            end = len(line) - len(right) + 1
            rest = line[end:].lstrip()
            if rest and rest[0] in _AFTER_MARKER:
                end = len(line) - len(rest) + 1
        elif labelled:
            end = len(line) - len(right) + 1
        found.append((m.group(1).lower(), start, end))
    return found


def _clean_object(text: str) -> str:
    text = text.strip().strip(_SEPARATORS + _AFTER_MARKER + " \t'").strip()
    if ":" in text:  # "Object: dog", "Description 1: dog"
        text = text.rsplit(":", 1)[1]
    text = text.replace("_", " ")
    text = re.sub(r"[^\w\s'-]", " ", text)
    return " ".join(w.strip("'-") for w in text.lower().split() if w.strip("'-"))


def _vocab_words(text: str, vocabulary: Collection[str] | None) -> tuple[list[str], list[str]]:
    """(kept words in order without repeats, dropped words) of one side's text."""
    kept: list[str] = []
    dropped: list[str] = []
    for word in _WORDS.findall(text.lower()):
        word = ALIASES.get(word, word)
        if vocabulary is not None and word not in vocabulary:
            dropped.append(word)
        elif word not in kept:
            if len(kept) < MAX_WORDS_PER_SIDE:
                kept.append(word)
            else:
                dropped.append(word)
    return kept, dropped


def _object_problem(obj: str) -> str | None:
    if not obj or not re.search(r"[^\W\d_]", obj):
        return "no object name (expected a short noun such as 'dog' or 'teddy bear')"
    if len(obj.split()) > MAX_OBJECT_WORDS:
        return f"object name is longer than {MAX_OBJECT_WORDS} words (expected a short noun such as 'dog' or 'teddy bear')"
    return None


def _parse_line(line: str, vocabulary: Collection[str] | None) -> tuple[Description | None, list[str], str | None]:
    """(description or None, dropped words, problem). A line without any marker is not a candidate
    (problem None): models surround their answer with prose."""
    line = _MARKUP.sub("", line)
    prev = None
    while prev != line:
        prev, line = line, _LEAD.sub("", line, count=1)
    marks = _markers(line)
    if not marks:
        return None, [], None
    kinds = [k for k, _, _ in marks]
    if kinds.count("fore") != 1 or kinds.count("back") != 1:
        return None, [], "expected exactly one (foreground) and one (background) marker"
    obj = _clean_object(line[: marks[0][1]])
    sides: dict[str, list[str]] = {}
    dropped: list[str] = []
    for i, (kind, _, end) in enumerate(marks):
        stop = marks[i + 1][1] if i + 1 < len(marks) else len(line)
        kept, out = _vocab_words(line[end:stop], vocabulary)
        sides[kind] = kept
        dropped += out
    problem = _object_problem(obj)
    if problem is None:
        missing = [name for name, kind in (("foreground", "fore"), ("background", "back")) if not sides[kind]]
        if missing:
            problem = f"no {' and no '.join(missing)} word{'s' if len(missing) > 1 else ''} from the vocabulary"
    if problem is not None:
        return None, dropped, problem
    return Description(obj, tuple(sides["fore"]), tuple(sides["back"])), dropped, None


def vocabulary_text() -> str:
    """The vocabulary as "category: word, word, ..." lines."""
    return "\n".join(f"- {cat}: {', '.join(words)}" for cat, words in VOCABULARY.items())


def _expected(vocabulary: Collection[str] | None) -> str:
    where = " with words from the vocabulary" if vocabulary is not None else ""
    return f"one description per line in the form `{FORMAT}`{where}, e.g. `{EXAMPLE}`"


def parse_descriptions(text: str, vocabulary: Collection[str] | None = VOCABULARY_WORDS) -> tuple[list[Description], list[str]]:
    """Read the candidates in ``text`` (one per line, the paper's format).

    Returns (descriptions without duplicates, in order; words left out because they are not in
    ``vocabulary``, each once, in order). ``vocabulary=None`` keeps every word. Raises InputError, quoting
    the text, when no line holds a valid description."""
    if not isinstance(text, str):
        raise InputError(f"description text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InputError(f"the description text is empty; expected {_expected(vocabulary)}")
    found: list[Description] = []
    keys: set = set()
    dropped: list[str] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        desc, out, problem = _parse_line(line, vocabulary)
        for word in out:
            if word not in dropped:
                dropped.append(word)
        if problem is not None and len(problems) < 5:
            unique = list(dict.fromkeys(out))
            detail = f" (left out as not in the vocabulary: {', '.join(unique[:12])})" if unique and "vocabulary" in problem else ""
            problems.append(f"line {number}: {problem}{detail}")
        if desc is not None and desc.key() not in keys:
            keys.add(desc.key())
            found.append(desc)
    if not found:
        why = "; ".join(problems) if problems else "no line has (foreground) and (background) markers"
        raise InputError(f"no valid description found ({why}). Expected {_expected(vocabulary)}. The text was: {quote(text)}")
    return found, dropped


def make_description(obj: str, foreground: str | Iterable[str], background: str | Iterable[str],
                     vocabulary: Collection[str] | None = VOCABULARY_WORDS) -> tuple[Description, list[str]]:
    """A description from separate fields (object name, foreground words, background words), cleaned
    exactly as the parser cleans a line. Returns (description, dropped words); InputError when a field
    is empty or holds no vocabulary word."""
    fields = []
    for value in (foreground, background):
        fields.append(value if isinstance(value, str) else " ".join(value))
    if not isinstance(obj, str):
        raise InputError(f"object must be a string, got {type(obj).__name__}")
    cleaned = _clean_object(obj)
    problem = _object_problem(cleaned)
    if problem is not None:
        raise InputError(f"{problem}: got object {quote(obj, 80)}")
    sides, dropped = [], []
    for name, value in zip(("foreground", "background"), fields):
        kept, out = _vocab_words(value, vocabulary)
        dropped += [w for w in out if w not in dropped]
        if not kept:
            extra = f" from the vocabulary ({', '.join(sorted(VOCABULARY_WORDS))})" if vocabulary is not None else ""
            raise InputError(f"no {name} word{extra}: got {quote(value, 200)}")
        sides.append(tuple(kept))
    return Description(cleaned, sides[0], sides[1]), dropped


def description_set(text: str = "", obj: str = "", foreground: str = "", background: str = "",
                    vocabulary_only: bool = True) -> DescriptionSet:
    """The description-input step: candidates from ``text`` (the paper's one-line format, one per line)
    when it is not blank, otherwise one candidate from the separate fields."""
    vocabulary = VOCABULARY_WORDS if vocabulary_only else None
    if text.strip():
        cands, dropped = parse_descriptions(text, vocabulary)
        return DescriptionSet(cands, raw=text, dropped=tuple(dropped))
    desc, dropped = make_description(obj, foreground, background, vocabulary)
    return DescriptionSet([desc], raw=desc.line(), dropped=tuple(dropped))
