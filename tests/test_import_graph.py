"""The package's import graph, read from the source with ``ast``: no circles, and the low layers never
import the high ones (docs/design.md, "Layers").

Every ``import`` counts, also those inside functions: a lazy import is still a dependency. Imports
under ``if TYPE_CHECKING:`` do not (they never run). Registries load their built-in components by
module *name* (``importlib``), which is the one sanctioned way for a low layer to reach a high one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "dapseg"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _known(name: str) -> str | None:
    """The module ``name`` refers to: itself, or the closest enclosing package/module."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports_of(name: str) -> set[str]:
    """The package modules ``name`` imports (``from a.b import c`` counts as a.b.c when that is a module)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(m for a in node.names if a.name.startswith("dapseg") and (m := _known(a.name)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            if not module.startswith("dapseg"):
                continue
            for alias in node.names:
                target = _known(f"{module}.{alias.name}")
                out.add(target if target == f"{module}.{alias.name}" else _known(module))
    out.discard(name)
    out.discard(None)
    return out


GRAPH = {name: imports_of(name) for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_parser_sees_known_edges():
    # guards the test itself: a broken parser would find no edges and no cycles
    assert "dapseg.registry" in GRAPH["dapseg.config.schema"]
    assert "dapseg.config.schema" in GRAPH["dapseg.config"]  # the package re-exports its modules
    assert "dapseg.heads.base" in GRAPH["dapseg.heads.proxy"]
    assert "dapseg.config" in GRAPH["dapseg.api"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


# What each low layer may import from the package (besides itself).
ALLOWED = {
    # the registry loads the installed outside components (entry points) through ``outside``, which
    # imports nothing from the package
    "dapseg.registry": {"dapseg.outside"},
    "dapseg.outside": set(),
    "dapseg.files": set(),
    "dapseg.termination": set(),
    "dapseg.precision": set(),
    "dapseg.workers": set(),
    "dapseg.folder_lock": {"dapseg.files"},
    # schema, overrides, presets: each other; outside: the presets outside code added
    "dapseg.config": {"dapseg.config", "dapseg.registry", "dapseg.outside"},
    "dapseg.heads": {"dapseg.heads", "dapseg.registry"},
    "dapseg.models": {"dapseg.models", "dapseg.config", "dapseg.registry", "dapseg.weights", "dapseg.files"},
    # mask generators build models (SAM, SAM2, Mask2Former, EoMT) and read mask files (through the one
    # image reader, a base module)
    "dapseg.masks": {"dapseg.masks", "dapseg.models", "dapseg.config", "dapseg.registry", "dapseg.weights",
                     "dapseg.files", "dapseg.images"},
    # the affinity analysis sits beside eval: models, heads, data and eval's plumbing, never the segmenter
    # the public extension surface: components, heads, models and the base, never the pipeline (api,
    # bundle, eval ...) or the entry points
    "dapseg.extend": {"dapseg.config", "dapseg.heads", "dapseg.inference", "dapseg.masks", "dapseg.models",
                      "dapseg.outside", "dapseg.refine", "dapseg.registry"},
    "dapseg.analysis": {"dapseg.analysis", "dapseg.data", "dapseg.eval", "dapseg.files", "dapseg.heads",
                        "dapseg.inference.preprocess", "dapseg.models", "dapseg.config", "dapseg.registry",
                        "dapseg.workers"},
}


def _layer(name: str) -> str | None:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if name == layer or name.startswith(layer + "."):
            return layer
    return None


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _layer(n) is not None))
def test_low_layers_never_import_upward(name):
    allowed = ALLOWED[_layer(name)]
    upward = sorted(m for m in GRAPH[name] if not any(m == a or m.startswith(a + ".") for a in allowed))
    assert upward == [], f"{name} imports {upward}"


def test_no_module_of_the_package_imports_the_extension_surface():
    """``dapseg.extend`` is for outside code: the package itself imports what it needs from where it
    lives, so the surface can gather from every layer without closing a circle."""
    importers = sorted(name for name, deps in GRAPH.items() if "dapseg.extend" in deps)
    assert "dapseg.extend" in MODULES and importers == []


def test_the_registry_loads_builtins_by_name_only():
    """Built-in modules a registry names exist (a typo would only show at the first lookup)."""
    from dapseg.registry import all_registries

    for registry in all_registries().values():
        for module in registry._builtins:
            assert module in MODULES, module
