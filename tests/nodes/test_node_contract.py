"""The conventions every node of the pack follows, checked on every node in NODE_CLASS_MAPPINGS.

A node added to any module of nodes/ is bound by these tests without being listed here.
"""
from __future__ import annotations

import pytest

from comfyui_harmonize.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, widgets

# ComfyUI's own types (its nodes, comfy_types and the widget types); every other type is the pack's own.
CORE_TYPES = {"IMAGE", "MASK", "LATENT", "MODEL", "CLIP", "VAE", "CONDITIONING", "CONTROL_NET", "CLIP_VISION",
              "CLIP_VISION_OUTPUT", "STYLE_MODEL", "GLIGEN", "UPSCALE_MODEL", "SIGMAS", "NOISE", "SAMPLER",
              "GUIDER", "AUDIO", "VIDEO", "INT", "FLOAT", "STRING", "BOOLEAN", "*"}
SCALAR_WIDGETS = ("INT", "FLOAT", "BOOLEAN")
PREFIX = "HARMONIZE_"

NODES = sorted(NODE_CLASS_MAPPINGS)


def inputs(cls) -> dict[str, tuple]:
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


def input_type(spec: tuple):
    """The type of an input spec: a type name, or 'COMBO' for a list of choices."""
    return "COMBO" if isinstance(spec[0], (list, tuple)) else spec[0]


def all_inputs():
    for node_id in NODES:
        for name, spec in inputs(NODE_CLASS_MAPPINGS[node_id]).items():
            yield node_id, name, spec


def test_every_node_module_is_registered():
    """The ids the contract is checked on: more than a handful, each with a display name."""
    assert len(NODES) >= 20
    assert set(NODES) == set(NODE_DISPLAY_NAME_MAPPINGS)


@pytest.mark.parametrize("node_id", NODES)
def test_names_category_and_description(node_id):
    cls = NODE_CLASS_MAPPINGS[node_id]
    assert node_id.startswith("Harmonize") and node_id == cls.__name__
    assert NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("Harmonize: ")
    assert cls.CATEGORY == "harmonize" or cls.CATEGORY.startswith("harmonize/")
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) >= 40
    assert callable(getattr(cls, cls.FUNCTION))


@pytest.mark.parametrize("node_id", NODES)
def test_every_input_has_a_tooltip(node_id):
    for name, spec in inputs(NODE_CLASS_MAPPINGS[node_id]).items():
        assert len(spec) == 2 and isinstance(spec[1], dict), f"{node_id}.{name} has no options dict"
        tip = spec[1].get("tooltip")
        assert isinstance(tip, str) and tip.strip(), f"{node_id}.{name} has no tooltip"


@pytest.mark.parametrize("node_id", NODES)
def test_every_output_has_a_tooltip_and_a_name(node_id):
    cls = NODE_CLASS_MAPPINGS[node_id]
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
    assert all(isinstance(t, str) and t.strip() for t in cls.OUTPUT_TOOLTIPS), node_id


@pytest.mark.parametrize("node_id", NODES)
def test_search_aliases(node_id):
    aliases = NODE_CLASS_MAPPINGS[node_id].SEARCH_ALIASES
    assert isinstance(aliases, (list, tuple)) and aliases
    assert all(isinstance(a, str) and a == a.strip() and a for a in aliases)
    assert len(set(aliases)) == len(aliases), f"{node_id} lists an alias twice"
    assert "harmonize" in aliases  # every node is found by the pack's own word


@pytest.mark.parametrize("node_id", NODES)
def test_custom_types_carry_the_pack_prefix(node_id):
    cls = NODE_CLASS_MAPPINGS[node_id]
    types = [t for t in cls.RETURN_TYPES]
    types += [input_type(spec) for spec in inputs(cls).values() if input_type(spec) != "COMBO"]
    for t in types:
        assert t in CORE_TYPES or t.startswith(PREFIX), f"{node_id}: type {t!r} needs the {PREFIX} prefix"
        if t.startswith(PREFIX):
            assert t in widgets.CUSTOM_TYPES, f"{node_id}: {t} is not declared in nodes/widgets.py"


@pytest.mark.parametrize("name", sorted(widgets.CONCEPTS))
def test_one_spec_per_concept(name):
    """Every input called `seed` (`feather`, `detail`, `dtype`, ...) is the shared spec of nodes/widgets.py:
    the same type, default, range and tooltip on every node."""
    allowed = widgets.CONCEPTS[name]
    found = [(node_id, spec) for node_id, n, spec in all_inputs() if n == name]
    assert found, f"no node has an input called {name!r}: drop it from widgets.CONCEPTS"
    for node_id, spec in found:
        assert any(spec == a for a in allowed), f"{node_id}.{name} is not the shared spec of nodes/widgets.py"


def test_a_widget_on_several_nodes_is_a_shared_concept():
    """A number or switch widget that two nodes share by name must come from nodes/widgets.py, so that its
    default cannot drift between copies."""
    seen: dict[str, set[str]] = {}
    for node_id, name, spec in all_inputs():
        if input_type(spec) in SCALAR_WIDGETS:
            seen.setdefault(name, set()).add(node_id)
    shared = {name for name, ids in seen.items() if len(ids) > 1}
    assert shared - set(widgets.CONCEPTS) == set()


def test_the_contract_catches_a_copied_spec(monkeypatch):
    """The concept check fails on a node whose `seed` differs from the shared spec (here: another default)."""
    cls = NODE_CLASS_MAPPINGS["HarmonizeDiffHarmonyEncode"]
    original = cls.INPUT_TYPES

    def drifted(klass):
        spec = original()
        spec["required"]["seed"] = ("INT", {**widgets.SEED[1], "default": 8888})
        return spec

    monkeypatch.setattr(cls, "INPUT_TYPES", classmethod(drifted))
    with pytest.raises(AssertionError, match="HarmonizeDiffHarmonyEncode.seed"):
        test_one_spec_per_concept("seed")
