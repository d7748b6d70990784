"""The preset store: the package's preset files, the presets derived from them, config files.

A preset is a YAML file under ``dapseg/configs/presets`` (data, never executed code), or settings that
outside code added (``dapseg.extend.register_preset``, kept by ``dapseg.outside``). A preset may
name a ``base`` preset and override parts of it. A plug-in that declares ``derived_preset`` in its
registry entry (its description, e.g. FSA's) gets a ``<preset>-<plug-in>`` twin of every preset whose
head and strategy take plug-ins (``no_plugins``, ``config.schema.refuses_plugins``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dapseg.config.schema import HeadConfig, InferenceConfig, SegmenterConfig, refuses_plugins
from dapseg.outside import outside_presets
from dapseg.registry import HEADS, PLUGINS, STRATEGIES


def _preset_dir() -> Path:
    return Path(str(resources.files("dapseg") / "configs" / "presets"))


def _raw_presets() -> dict[str, dict[str, Any]]:
    presets: dict[str, dict[str, Any]] = {}
    for path in sorted(_preset_dir().glob("*.yaml")):
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a preset must be a mapping")
        presets[path.stem] = data
    for name, data in outside_presets().items():  # added by outside code (dapseg.extend.register_preset)
        if name in presets:
            raise ValueError(f"preset {name!r} registered from outside the package is a preset of dapseg's own")
        presets[name] = data
    return presets


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    if "name" in over and over["name"] != out.get("name"):
        out.pop("params", None)  # another component: the base's parameters are not its parameters
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "params":
            out[key] = _merge(out[key], value)
        elif key == "params" and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve(name: str, raw: dict[str, dict[str, Any]], seen: tuple[str, ...] = ()) -> dict[str, Any]:
    if name in seen:
        raise ValueError(f"preset {name!r} inherits from itself via {' -> '.join(seen)}")
    data = dict(raw[name])
    base = data.pop("base", None)
    if base is not None:
        if base not in raw:
            raise ValueError(f"preset {name!r} names unknown base {base!r}")
        data = _merge(_resolve(base, raw, (*seen, name)), data)
    data["name"] = name
    return data


def _takes_plugins(resolved: dict[str, Any]) -> bool:
    """Whether a resolved preset's data has no plug-in yet and its head and strategy take one."""
    head = (resolved.get("head") or {}).get("name", HeadConfig().name)
    mode = (resolved.get("inference") or {}).get("mode", InferenceConfig().mode)
    return not resolved.get("plugins") and not refuses_plugins(HEADS, head) and not refuses_plugins(STRATEGIES, mode)


def _derived_presets(raw: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Presets made from others: ``<preset>-<plug-in>`` for every plug-in that declares a
    ``derived_preset`` (the description it adds) and every preset that can take it."""
    offers = {name: PLUGINS.get(name).extras.get("derived_preset") for name in PLUGINS.names()}
    derived = {}
    for name in raw:
        resolved = _resolve(name, raw)
        if not _takes_plugins(resolved):
            continue
        for plugin, what in offers.items():
            twin = f"{name}-{plugin}"
            if not what or twin in raw or name.endswith(f"-{plugin}"):
                continue
            description = f"{raw[name].get('description', name)} + {what}"
            derived[twin] = {"base": name, "plugins": [{"name": plugin}], "description": description}
    return derived


def _all_raw() -> dict[str, dict[str, Any]]:
    raw = _raw_presets()
    return {**raw, **_derived_presets(raw)}


def list_presets() -> list[str]:
    return sorted(_all_raw())


def default_preset(presets: Sequence[str] | None = None) -> str:
    """The first preset of ``configs/presets/default.txt`` (the headline method, then its fallbacks)
    among ``presets`` (default: every preset), else the first of them."""
    presets = list(list_presets() if presets is None else presets)
    if not presets:
        raise ValueError("no presets found under dapseg/configs/presets")
    lines = (_preset_dir() / "default.txt").read_text(encoding="utf-8").splitlines()
    wanted = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return next((name for name in wanted if name in presets), presets[0])


def load_preset(name: str, overrides: dict[str, Any] | None = None) -> SegmenterConfig:
    """The validated config of preset ``name`` with ``overrides`` applied."""
    raw = _all_raw()
    if name not in raw:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(raw))}")
    config = SegmenterConfig.model_validate(_resolve(name, raw))
    return config.with_overrides(overrides)


def _toml_loads(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser as the `tomli` package
        import tomli as tomllib
    return tomllib.loads(text)


def load_config_file(path: str | Path, overrides: dict[str, Any] | None = None) -> SegmenterConfig:
    """A config from a YAML/TOML file written by a user; ``base:`` may name a preset."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise FileNotFoundError(f"cannot read config file {path}: {e.strerror}") from e
    try:
        # yaml.safe_load: a tag such as !!python/object/apply is refused, never executed.
        data = _toml_loads(text) if path.suffix == ".toml" else yaml.safe_load(text) or {}
    except (yaml.YAMLError, ValueError) as e:  # tomllib's TOMLDecodeError is a ValueError
        detail = " ".join(str(e).split())
        raise ValueError(f"config file {path} is not valid {path.suffix.lstrip('.').upper() or 'YAML'} "
                         f"(only plain data is allowed): {detail}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        raw = _all_raw()
        if base not in raw:
            raise ValueError(f"{path}: unknown base preset {base!r}; valid presets: {', '.join(sorted(raw))}")
        data = _merge(_resolve(base, raw), data)
    data.setdefault("name", path.stem)
    return SegmenterConfig.model_validate(data).with_overrides(overrides)
