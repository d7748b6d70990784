"""No module outside ``models/vfm/`` branches on a VFM family's name: families declare traits
(``FamilyTraits``), parameters and weights sources, and the rest of the package reads those."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dapseg.registry import VFM_FAMILIES
from source_checks import string_constants as _strings

SRC = Path(__file__).resolve().parents[1] / "src" / "dapseg"
VFM_DIR = SRC / "models" / "vfm"



def _about_vfm(node: ast.AST) -> bool:
    """Whether an expression is about a VFM / its family (by the identifiers it uses)."""
    names = [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]
    names += [n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)]
    names += [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and n.value == "family"]
    return any("family" in n.lower() or "vfm" in n.lower() for n in names)


def family_name_checks(source: str, families: set[str]) -> list[tuple[int, str]]:
    """(line, code) of every check of a family name: a comparison (==, !=, in, not in, match case) or
    ``.startswith`` / ``.endswith`` of an expression about a VFM against a family's name, and any
    comparison of a ``family`` value with a string."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            consts = set().union(*(_strings(o) for o in operands))
            others = [o for o in operands if not _strings(o)]
            mentions_family = any("family" in ast.unparse(o).lower() for o in others)
            if (consts & families and any(_about_vfm(o) for o in others)) or (consts and mentions_family):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("startswith", "endswith", "removeprefix"):
            consts = set().union(*(_strings(a) for a in node.args))
            if any(c.startswith(tuple(families)) for c in consts) and _about_vfm(node.func.value):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Match) and _about_vfm(node.subject):
            cases = {c.pattern.value.value for c in node.cases
                     if isinstance(c.pattern, ast.MatchValue) and isinstance(c.pattern.value, ast.Constant)}
            if cases & families:
                found.append((node.lineno, ast.unparse(node.subject)))
    return found


@pytest.mark.parametrize("snippet", [
    'if backbone.vfm_family == "mae": lam = 4.5',
    'if getattr(self.vfm, "family", None) == "sam": pass',
    'x = spec.family in ("mae", "dino")',
    'ok = cfg.vfm.name.startswith("mae")',
    'match vfm.family:\n    case "sd": pass',
])
def test_the_check_finds_family_branches(snippet):
    assert family_name_checks(snippet, {"mae", "sam", "dino", "sd"})


def test_the_check_lets_other_uses_of_the_same_words_pass():
    ok = 'if params.regions in ("slic", "sam"): pass\nif "sam" not in reuse: pass\nrefiner = "sam"'
    assert family_name_checks(ok, {"sam"}) == []


def test_no_module_outside_models_vfm_branches_on_a_family_name():
    families = set(VFM_FAMILIES.names())
    assert {"dino", "mae", "sam", "sd"} <= families
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if VFM_DIR in path.parents:
            continue
        for line, code in family_name_checks(path.read_text(), families):
            offenders.append(f"{path.relative_to(SRC)}:{line}: {code}")
    assert not offenders, "branches on a VFM family's name (declare a FamilyTraits entry instead):\n" + "\n".join(
        offenders)
