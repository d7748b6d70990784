"""Overrides: settings changed from the command line or the Python API, applied to a config's data.

Keys are dotted (``inference.stride=112``) or, where unambiguous, bare field names (``rho=0.5``);
plug-ins are addressed by name (``plugins.<name>.params.<key>``, or ``<name>.…`` as sugar). Values
given as text are parsed as plain YAML.
"""

from __future__ import annotations

from typing import Any

import yaml

from dapseg.registry import PLUGINS

_SECTIONS_WITH_PARAMS = ("head", "inference", "refine", "masks")


def _resolve_key(data: dict[str, Any], key: str) -> list[str]:
    """Dotted path for an override key. Bare names are looked up in every section and plug-in."""
    if "." in key:
        return key.split(".")
    if key in data:
        return [key]
    hits: list[list[str]] = []
    for section, value in data.items():
        if isinstance(value, dict):
            if key in value:
                hits.append([section, key])
            elif section in _SECTIONS_WITH_PARAMS and key in value.get("params", {}):
                hits.append([section, "params", key])
    for plugin in data.get("plugins") or []:
        if key in plugin.get("params", {}):
            hits.append(["plugins", plugin["name"], "params", key])
    if len(hits) == 1:
        return hits[0]
    if not hits:
        # Every component's params are in the dump with their defaults (``Registry.validate``),
        # so a bare name found nowhere is not a setting of this config.
        raise KeyError(f"unknown setting {key!r}; use a dotted key such as head.params.{key}")
    raise KeyError(f"setting {key!r} is ambiguous: {', '.join('.'.join(h) for h in hits)}")


def _plugin_path(data: dict[str, Any], path: list[str]) -> tuple[str, list[str]] | None:
    """(plug-in name, rest) for ``plugins.<name>.<rest>`` or the sugar ``<plug-in name>.<rest>``."""
    if path[0] == "plugins" and len(path) > 1:
        return path[1], path[2:]
    if path[0] not in data and len(path) > 1 and path[0] in PLUGINS:
        return path[0], path[1:]
    return None


def _set_plugin(data: dict[str, Any], name: str, rest: list[str], value: Any) -> None:
    """``<name>.enabled=true|false`` adds / removes plug-in ``name``; ``<name>.params.<key>=v`` sets a
    parameter of an enabled plug-in; ``<name>.params={...}`` replaces its parameters."""
    plugins = data.setdefault("plugins", None) or []
    data["plugins"] = plugins
    entry = next((p for p in plugins if p.get("name") == name), None)
    if rest == ["enabled"]:
        if not isinstance(value, bool):
            raise ValueError(f"plugins.{name}.enabled must be true or false, got {value!r}")
        if value and entry is None:
            PLUGINS.get(name)  # an unknown plug-in fails here, naming the known ones
            plugins.append({"name": name, "params": {}})
        elif not value and entry is not None:
            plugins.remove(entry)
        return
    if not rest or rest[0] != "params" or len(rest) > 2:
        raise KeyError(f"unknown setting plugins.{name}.{'.'.join(rest)}; use plugins.{name}.enabled "
                       f"or plugins.{name}.params.KEY")
    if entry is None:
        raise KeyError(f"plug-in {name!r} is not enabled; add plugins.{name}.enabled=true (or --{name})")
    if len(rest) == 1:
        entry["params"] = dict(value or {})
    else:
        entry.setdefault("params", {})[rest[1]] = value


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Set each (possibly dotted) key of ``overrides`` in the nested ``data`` dict, in place.

    Plug-ins are a list; they are addressed by name (``plugins.fsa.params.lam=2``, or ``fsa.…`` as
    sugar) and switched on and off before any of their parameters are set.
    """
    resolved = [(_resolve_key(data, key), value) for key, value in overrides.items()]
    plugin_keys = [(_plugin_path(data, path), value) for path, value in resolved]
    toggles = [(pp, v) for pp, v in plugin_keys if pp is not None and pp[1] == ["enabled"]]
    for (name, rest), value in toggles:
        _set_plugin(data, name, rest, value)
    for (path, value), (pp, _) in zip(resolved, plugin_keys, strict=True):
        if pp is not None:
            if pp[1] != ["enabled"]:
                _set_plugin(data, pp[0], pp[1], value)
            continue
        node = data
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[path[-1]] = value


def parse_value(text: str) -> Any:
    """A command-line value parsed as YAML: "0.5" -> 0.5, "none" stays a string, "null" -> None, "[8, 16]" -> a list.

    Safe YAML only: a tag such as ``!!python/object`` is refused with a ValueError (no traceback)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"value {text[:200]!r} is not a plain YAML value ({first})") from e


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value' -> (key, parsed value)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key=value")
    key, value = text.split("=", 1)
    try:
        return key.strip(), parse_value(value.strip())
    except ValueError as e:
        raise ValueError(f"override {key.strip()!r}: {e}") from e
