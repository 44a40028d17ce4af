"""Finding model files in model folders: the one folder walker and the one resolver behind every model list
(Stable Diffusion models, refiners, PiDiNet checkpoints, evaluators, local VLM folders).

Users link models into ComfyUI's folders, so links are followed; every folder is entered once, by its real
path, and a link up to a folder that holds the root being walked (a parent, the models root) is not entered,
so a link loop can neither hang the walk nor multiply the choices. A model folder is listed under each name
that leads to it (a user may link one model under two names); it is never entered.
Folders are walked in sorted order, so the same folder contents always give the same names: a model's name
is its path relative to the root it was found in (a root that is itself a model is named by its folder
name); when two roots, or two links, lead to the same name or the same real folder, the first one wins.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .errors import WeightsError

DirTest = Callable[[Path], bool]


def find(roots: Iterable[str | os.PathLike], *, model_dir: DirTest | None = None,
         file_suffixes: Sequence[str] = (), skip_dir: DirTest | None = None,
         max_depth: int | None = None) -> dict[str, Path]:
    """``{name: path}`` of the models under ``roots``, sorted by name.

    ``model_dir(folder)`` says a folder is a model (it is listed and not entered); files whose name ends with
    one of ``file_suffixes`` (any case) are models; ``skip_dir(folder)`` says a folder is neither listed nor
    entered; ``max_depth`` limits how deep below a root folders are looked at (the root is depth 0).
    """
    suffixes = tuple(s.lower() for s in file_suffixes)
    visited: set[str] = set()
    found: dict[str, Path] = {}

    def name_of(path: Path, root: Path) -> str:
        return path.name if path == root else path.relative_to(root).as_posix()

    def visit(folder: Path, root: Path, depth: int) -> None:
        real = os.path.realpath(folder)
        if inside(roots_real[root], real):
            return  # a link up to a folder holding the root: entering it would walk the root again
        if skip_dir is not None and skip_dir(folder):
            return
        if model_dir is not None and model_dir(folder):
            found.setdefault(name_of(folder, root), folder)  # a model linked under two names is listed twice
            return
        if real in visited:
            return  # a folder reached again through a link is walked once (and a loop ends here)
        visited.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return  # unreadable folder: nothing to list in it
        for entry in entries:
            path = folder / entry.name
            try:
                is_dir = entry.is_dir()  # follows links; a broken or looping link is neither dir nor file
                is_file = not is_dir and entry.is_file()
            except OSError:
                continue
            if is_dir:
                if max_depth is None or depth < max_depth:
                    visit(path, root, depth + 1)
            elif is_file and suffixes and entry.name.lower().endswith(suffixes):
                found.setdefault(name_of(path, root), path)

    roots_real: dict[Path, str] = {}
    for root in roots:
        root = Path(root)
        if root.is_dir():
            roots_real[root] = os.path.realpath(root)
            visit(root, root, 0)
    return dict(sorted(found.items()))


def inside(path: str, folder: str) -> bool:
    """``path`` lies strictly inside ``folder`` (both real paths)."""
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def not_found(what: str, name: str, searched: Iterable[str | os.PathLike], found: Iterable[str],
              expected: str) -> WeightsError:
    """The one "not found" error: what was asked for, every folder searched, what is there, what was expected."""
    folders = ", ".join(str(f) for f in searched) or "no folder"
    have = ", ".join(found) or "nothing"
    return WeightsError(f"{what} {name!r} not found. Searched: {folders}. Found: {have}. Expected: {expected}")


def resolve(name: str, found: dict[str, Path], what: str, searched: Iterable[str | os.PathLike],
            expected: str) -> Path:
    """The path of choice ``name`` in ``found`` (a :func:`find` result), else the :func:`not_found` error."""
    if name in found:
        return found[name]
    raise not_found(what, name, searched, found, expected)
