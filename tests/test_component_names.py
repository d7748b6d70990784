"""No module outside a component's own module branches on the name of a registered head, strategy,
refiner, plug-in or mask generator: components declare what the rest of the package needs to know
(``Need``s and registry extras such as a strategy's ``windows`` plan, ``stages`` for the bench,
``no_plugins``, a plug-in's ``derived_preset``), and the rest of the package reads those.

Naming a component to *register* it or to *build a config* (``{"name": "fsa"}``, a schema default)
is not branching; comparing a mode, a name, a head, a plug-in, a refiner or a mask generator against
a component's name is. VFM families have their own test (``test_family_names.py``).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from dapseg.registry import HEADS, MASK_GENERATORS, PLUGINS, REFINERS, STRATEGIES
from source_checks import string_constants as _strings

SRC = Path(__file__).resolve().parents[1] / "src" / "dapseg"
# An expression is "about" a component when one of its identifiers (or a key it looks up) says so.
ABOUT = re.compile(r"mode|name|head|plugin|refine|mask|strateg", re.IGNORECASE)
# Branches that must stay, by "path relative to src/dapseg:line-free code" -> why. Keep it tiny.
ALLOWED: dict[str, str] = {}



def _about_component(node: ast.AST) -> bool:
    """Whether an expression is about a mode / name / head / plug-in / refiner / masks."""
    words = [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]
    words += [n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)]
    words += [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return any(ABOUT.search(w) for w in words)


def _tokens(text: str) -> set[str]:
    """The words of a string ("-fsa" -> {"fsa"}; "sam_vitb" stays one word, not "sam")."""
    return set(re.split(r"[^A-Za-z0-9_]+", text)) - {""}


def _case_strings(pattern: ast.pattern) -> set[str]:
    if isinstance(pattern, ast.MatchValue) and isinstance(pattern.value, ast.Constant):
        return {pattern.value.value} if isinstance(pattern.value.value, str) else set()
    if isinstance(pattern, ast.MatchOr):
        return {v for p in pattern.patterns for v in _case_strings(p)}
    return set()


def component_name_checks(source: str, names: set[str]) -> list[tuple[int, str, set[str]]]:
    """(line, code, component names) of every branch on a component's name: a comparison (==, !=, in,
    not in, is), a ``.startswith`` / ``.endswith``, a ``match`` case or a lookup in a dict display,
    of an expression about a component against the names."""
    found = []
    for node in ast.walk(ast.parse(source)):
        hits: set[str] = set()
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            others = [o for o in operands if not _strings(o)]
            if any(_about_component(o) for o in others):
                hits = set().union(*(_strings(o) for o in operands)) & names
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("startswith", "endswith") and _about_component(node.func.value):
            hits = {t for a in node.args for s in _strings(a) for t in _tokens(s)} & names
        elif isinstance(node, ast.Match) and _about_component(node.subject):
            hits = {v for case in node.cases for v in _case_strings(case.pattern)} & names
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Dict) \
                and _about_component(node.slice):
            hits = {v for key in node.value.keys if key is not None for v in _strings(key)} & names
        if hits:
            found.append((node.lineno, ast.unparse(node), hits))
    return found


def component_names() -> dict[str, set[Path]]:
    """Every registered name -> the files of the modules that register it (its own modules)."""
    owners: dict[str, set[Path]] = {}
    for registry in (HEADS, STRATEGIES, REFINERS, PLUGINS, MASK_GENERATORS):
        for name in registry.names():
            module = sys.modules[registry.get(name).builder.__module__]
            owners.setdefault(name, set()).add(Path(module.__file__).resolve())
    return owners


NAMES = {"dap", "naclip", "whole", "splice", "stitch", "fsa", "pamr", "sam", "folder"}


@pytest.mark.parametrize("snippet", [
    'if cfg.mode == "whole": pass',
    'x = cfg.inference.mode in ("splice", "stitch")',
    'if any(p.get("name") == "fsa" for p in plugins): pass',
    'if resolved.get("inference", {}).get("mode") != "stitch": pass',
    'ok = name.endswith("-fsa")',
    'ok = preset_name.startswith("dap")',
    'match config.head.name:\n    case "naclip" | "dap": pass',
    'f = {"dap": 1, "naclip": 2}[cfg.head.name]',
    'if self.refiner_name not in ("pamr",): pass',
    'if config.masks.name == "folder": pass',
])
def test_the_check_finds_component_name_branches(snippet):
    assert component_name_checks(snippet, NAMES)


@pytest.mark.parametrize("snippet", [
    # registering, constructing a config, schema defaults: naming is not branching
    'STRATEGIES.register("whole")(lambda: whole)',
    '@register_stitched("naclip")\ndef naclip_stitched(): pass',
    'overrides["masks"] = {"name": "folder", "params": {"root": root}}',
    'names = [*plugins, *(["fsa"] if args.fsa else [])]',
    'class InferenceConfig:\n    mode: str = "slide"',
    'HEADS.attach("dap", stages={"regions": ("DapHead.region_labels",)})',
    # the same words about other things
    'if params.regions in ("slic", "sam"): pass',
    'if p.sam_input == "processed": pass',
    'local = "folder" if weights.folder else "file"',
    'if kind == "folder": pass',
    'ok = vfm_spec.startswith("sam_vit")',
    # a comparison that is about a component, against a name that is no component's
    'if cfg.refine.name != "none": pass',
])
def test_the_check_lets_other_uses_of_the_same_words_pass(snippet):
    assert component_name_checks(snippet, NAMES) == []


def test_every_built_in_kind_is_looked_at():
    owners = component_names()
    assert {"dap", "naclip", "corrclip", "whole", "slide", "splice", "stitch", "pamr", "sam", "fsa",
            "folder"} <= set(owners)
    assert owners["stitch"] == {(SRC / "inference" / "stitch.py").resolve()}
    assert owners["sam"] == {(SRC / "refine" / "sam_prompt.py").resolve(), (SRC / "masks" / "sam.py").resolve()}


def test_no_module_outside_a_components_own_branches_on_its_name():
    owners = component_names()
    offenders, allowed_seen = [], set()
    for path in sorted(SRC.rglob("*.py")):
        rel = str(path.relative_to(SRC))
        for line, code, hits in component_name_checks(path.read_text(encoding="utf-8"), set(owners)):
            foreign = {n for n in hits if path.resolve() not in owners[n]}
            if not foreign:
                continue
            key = f"{rel}:{code}"
            if key in ALLOWED:
                allowed_seen.add(key)
                continue
            offenders.append(f"{rel}:{line}: {code}  (names {sorted(foreign)})")
    assert not offenders, ("branches on a component's name (let the component declare it: a Need or a registry "
                           "extra, docs/design.md 'Contracts'):\n" + "\n".join(offenders))
    assert allowed_seen == set(ALLOWED), f"ALLOWED lists branches that are gone: {set(ALLOWED) - allowed_seen}"
