"""Sweep grids: ``"rho=0,0.25,0.5 regions=none,slic"`` -> every combination as an override dict."""

from __future__ import annotations

import itertools
import re
from typing import Any

import yaml


def _scalar(text: str) -> Any:
    """A value as a YAML scalar ('0.5' -> 0.5, 'true' -> True, 'null' -> None, 'slic' -> 'slic')."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if isinstance(value, (dict, list)) else value


def parse_grid(text: str | list[str]) -> dict[str, list[Any]]:
    """Axes of the grid in the order given; each ``key=v1,v2,...`` (whitespace separates axes)."""
    parts = " ".join(text if isinstance(text, list) else [text]).split()
    if not parts:
        raise ValueError("empty --grid; expected e.g. \"rho=0,0.25,0.5 regions=none,slic\"")
    axes: dict[str, list[Any]] = {}
    for part in parts:
        if "=" not in part:
            raise ValueError(f"grid axis {part!r} is not of the form key=v1,v2,...")
        key, values = part.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"grid axis {part!r} has no key")
        if key in axes:
            raise ValueError(f"grid axis {key!r} given twice")
        items = [v for v in values.split(",")]
        if any(v == "" for v in items):
            raise ValueError(f"grid axis {part!r} has an empty value")
        parsed = [_scalar(v) for v in items]
        if len({repr(v) for v in parsed}) != len(parsed):
            raise ValueError(f"grid axis {key!r} repeats a value: {values}")
        axes[key] = parsed
    return axes


def combinations(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(axes)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes.values())]


def combo_slug(combo: dict[str, Any]) -> str:
    """A file-system-safe, unique, readable name: ``rho=0.25,regions=slic``."""
    text = ",".join(f"{k}={v}" for k, v in combo.items())
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", text) or "default"
