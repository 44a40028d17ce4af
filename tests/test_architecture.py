"""The pack's architecture as a test: no import cycle among its modules, the layer rule, and ComfyUI imported
only by nodes/host.py (never by pipelines/).

The import graph is read from the source (every ``import``/``from`` statement, at any depth, plus
``importlib.import_module("...")`` with a literal name), so a lazy import inside a function counts as a
dependency too. Layers, lowest first (a module may import its own sub-package and anything in a lower layer):

    pipelines.core  <-  pipelines.sd  <-  shared concerns (color, edges, describe, evaluation)
    <-  systems (diffharmony, zero_shot)  <-  ihd  <-  training  <-  nodes, commands  <-  the pack's __init__

Run as a script it prints the longest import chain of a tree: ``python tests/test_architecture.py [ROOT]``.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_harmonize"
SKIP_DIRS = {"tests", "fixtures", "benchmarks", "scripts", "docs", "workflows", ".git", "__pycache__"}

LAYERS = [
    ("pipelines.core",),
    ("pipelines.sd",),
    ("pipelines.color", "pipelines.edges", "pipelines.describe", "pipelines.evaluation"),
    ("pipelines.diffharmony", "pipelines.zero_shot"),
    ("pipelines.ihd",),
    ("pipelines.training",),
    ("nodes", "commands"),
    ("",),  # the pack's __init__ (registers the nodes with ComfyUI)
]
# Top-level module names that belong to ComfyUI (its own ``nodes`` module is only reachable by an absolute
# import, which the pack never uses for itself: inside the pack imports are relative).
COMFYUI_MODULES = {"comfy", "comfy_extras", "comfy_execution", "comfy_api", "comfy_config", "folder_paths",
                   "server", "execution", "nodes", "node_helpers", "latent_preview", "app", "utils"}
COMFYUI_HOST = "nodes.host"  # the one module allowed to import ComfyUI
# Old command names kept so that ``python -m`` with them says where the command went; they import nothing.
REDIRECTS = {"pipelines.benchmark", "pipelines.train_diffharmony"}


# ------------------------------------------------------------------------------------------ the graph
def module_name(path: Path, root: Path) -> str:
    """Dotted name relative to the pack root ("" for the root __init__)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def pack_modules(root: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in SKIP_DIRS or p.startswith(".") for p in rel[:-1]):
            continue
        found[module_name(path, root)] = path
    return found


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    path = modules.get(name)
    return path is not None and path.name == "__init__.py"


def _resolve(importer: str, level: int, target: str | None, modules: dict[str, Path]) -> str | None:
    """Pack module named by a relative import in ``importer`` (None when it leaves the pack)."""
    base = importer.split(".") if importer else []
    if not _is_package(importer, modules):
        base = base[:-1]  # a module's relative imports start from its package
    drop = level - 1
    if drop > len(base):
        return None
    base = base[:len(base) - drop] if drop else base
    return ".".join(base + (target.split(".") if target else []))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(pack modules, absolute top-level names) imported anywhere in the module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    internal, external = set(), set()

    def add_internal(target: str | None) -> None:
        if target is not None and target in modules and target != name:
            internal.add(target)

    def add_from(base: str, names) -> None:
        """``from base import x, y``: the sub-modules x, y where they are modules, else base itself."""
        subs = [f"{base}.{a.name}" if base else a.name for a in names]
        if all(s in modules for s in subs):
            for s in subs:
                add_internal(s)
        else:
            add_internal(base)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    add_internal(alias.name[len(PACKAGE) + 1:])
                else:
                    external.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                top = (node.module or "").split(".")[0]
                if top == PACKAGE:
                    add_from((node.module or "")[len(PACKAGE) + 1:], node.names)
                else:
                    external.add(top)
                continue
            base = _resolve(name, node.level, node.module, modules)
            if base is not None:
                add_from(base, node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and not node.args[0].value.startswith(".")):
            external.add(node.args[0].value.split(".")[0])
    return internal, external


def import_graph(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = pack_modules(root)
    graph, external = {}, {}
    for name, path in modules.items():
        graph[name], external[name] = imports_of(name, path, modules)
    return graph, external


# ------------------------------------------------------------------------------------------ the checks
def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (or one importing itself), each as a cycle
    path ``[a, b, ..., a]`` through it."""
    index, low, stack, on_stack, groups, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph.get(v, ()):
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return [_cycle_through(sorted(g), graph) for g in sorted(groups)]


def _cycle_through(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle from the group's first module back to itself, inside the group."""
    start, members = group[0], set(group)
    paths, seen = {start: [start]}, set()
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w == start:
                    return paths[v] + [start]
                if w in members and w not in seen:
                    seen.add(w)
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return group


def layer_of(name: str) -> tuple[int, str] | None:
    """(layer, sub-package) of a module."""
    for depth, groups in enumerate(LAYERS):
        for group in groups:
            if name == group or (group and name.startswith(group + ".")):
                return depth, group
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for importer in sorted(graph):
        mine = layer_of(importer)
        if importer in REDIRECTS:
            bad += [f"{importer} (a moved command's name) imports {t}" for t in sorted(graph[importer])]
            continue
        if mine is None:
            if importer in ("pipelines",):
                continue
            bad.append(f"{importer} belongs to no layer")
            continue
        for target in sorted(graph[importer]):
            theirs = layer_of(target)
            if theirs is None:
                continue  # a package __init__ (pipelines/) holds no code
            if theirs[0] > mine[0] or (theirs[0] == mine[0] and theirs[1] != mine[1]):
                bad.append(f"{importer} (layer {mine[0]}, {mine[1] or 'root'}) imports {target} "
                           f"(layer {theirs[0]}, {theirs[1] or 'root'})")
    return bad


def comfyui_imports(external: dict[str, set[str]]) -> list[str]:
    return [f"{name} imports ComfyUI's {sorted(mods & COMFYUI_MODULES)}" for name, mods in sorted(external.items())
            if name != COMFYUI_HOST and mods & COMFYUI_MODULES]


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest import chain (a path of imports without repeating a module; cycles cut where met)."""
    best: dict[str, list[str]] = {}

    def chain(v: str, active: frozenset) -> list[str]:
        if v in best:
            return best[v]
        longest = [v]
        for w in sorted(graph.get(v, ())):
            if w in active:
                continue
            c = [v] + chain(w, active | {w})
            if len(c) > len(longest):
                longest = c
        if not (graph.get(v, set()) & active):
            best[v] = longest  # memoise only where no cycle was cut
        return longest

    return max((chain(v, frozenset({v})) for v in sorted(graph)), key=len, default=[])


# ------------------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT)


def test_the_graph_sees_the_pack(graph):
    internal, external = graph
    assert "pipelines.sd.loading" in internal and "nodes.host" in internal
    assert "pipelines.core.errors" in internal["pipelines.sd.loading"]
    assert "torch" in external["pipelines.sd.loading"]


def test_no_import_cycle(graph):
    cycles = find_cycles(graph[0])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layer_rule(graph):
    bad = layer_violations(graph[0])
    assert not bad, "layer rule broken:\n" + "\n".join(bad)


def test_only_the_host_module_imports_comfyui(graph):
    bad = comfyui_imports(graph[1])
    assert not bad, "\n".join(bad)


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_checker_reports_a_synthetic_cycle_a_layer_breach_and_comfyui(tmp_path):
    root = write(tmp_path / "pack", {
        "__init__.py": "from .nodes import x\n",
        "nodes/__init__.py": "",
        "nodes/x.py": "from ..pipelines.sd import a\n",
        "nodes/host.py": "import folder_paths\n",
        "pipelines/__init__.py": "",
        "pipelines/core/__init__.py": "",
        "pipelines/core/c.py": "def f():\n    from ..sd import a  # a lazy import still counts\n",
        "pipelines/sd/__init__.py": "",
        "pipelines/sd/a.py": "from . import b\n",
        "pipelines/sd/b.py": "import comfy.model_management\nfrom .a import thing\n",
    })
    internal, external = import_graph(root)
    assert internal["pipelines.sd.a"] == {"pipelines.sd.b"}
    assert find_cycles(internal) == [["pipelines.sd.a", "pipelines.sd.b", "pipelines.sd.a"]]
    assert layer_violations(internal) == [
        "pipelines.core.c (layer 0, pipelines.core) imports pipelines.sd.a (layer 1, pipelines.sd)"]
    assert comfyui_imports(external) == ["pipelines.sd.b imports ComfyUI's ['comfy']"]
    assert longest_chain(internal) == ["", "nodes.x", "pipelines.sd.a", "pipelines.sd.b"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}}) == [["a", "b", "c", "a"], ["d", "d"]]


if __name__ == "__main__":
    tree = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    internal, _ = import_graph(tree)
    path = longest_chain(internal)
    print(f"{len(path)} modules, {len(path) - 1} imports: " + " -> ".join(p or "(pack __init__)" for p in path))
    for c in find_cycles(internal):
        print("cycle: " + " -> ".join(c))
