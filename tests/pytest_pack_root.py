"""pytest plugin (loaded by ``-p`` in pyproject.toml): collect the repository root as a plain folder.

The root is the pack's package (an ``__init__.py`` with relative imports, as ComfyUI needs), so pytest would
import it as a package named after the clone's folder before running any test. A clone's folder is usually
not a Python name (``ComfyUI-Harmonize``, ``custom_nodes/ComfyUI-Harmonize``), and then every test fails
with "attempted relative import with no known parent package". The tests import the pack as
``comfyui_harmonize`` instead; nothing needs the root imported under its folder's name.
"""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_collect_directory(path, parent):
    if path == ROOT:
        return pytest.Dir.from_parent(parent, path=path)
    return None
