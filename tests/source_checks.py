"""Helpers of the tests that read the package's source with ``ast`` (component and family names)."""

from __future__ import annotations

import ast


def string_constants(node: ast.AST) -> set[str]:
    """String constants of ``node``: a constant, or the items of a tuple / list / set display."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return {v for elt in node.elts for v in string_constants(elt)}
    return set()
