"""Code from outside the package: the ``dapseg.components`` entry points, ``--import MODULE_OR_FILE``
and the presets that outside code adds.

Outside code registers components through ``dapseg.extend`` when it is imported. It is imported in
two ways, both the user's explicit choice:

* an installed distribution declares an entry point in the group ``dapseg.components``
  (``[project.entry-points."dapseg.components"] mine = "mypkg.dapseg_parts"``): every such entry
  point is loaded once, before the first registry lookup (``dapseg.registry``) and before every CLI
  command. An entry point naming a module imports it; one naming a callable (``"mypkg:register"``)
  also calls it with no arguments;
* ``--import MODULE_OR_FILE`` on every ``dapseg`` command (``import_components``): a dotted module
  name is imported as Python imports it; a path (ending in ``.py`` or holding a ``/``) is imported
  from that file (its folder is not put on ``sys.path``: a file that imports its siblings is a
  package to install, or a module on ``PYTHONPATH``).

Nothing else the package reads (configs, presets, weights, masks, results) ever runs code.

A failure names the entry point and its distribution, or the module or file, as an
``OutsideCodeError``. This module imports nothing from the package (the base layer).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import sys
import traceback
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

ENTRY_POINT_GROUP = "dapseg.components"


class OutsideCodeError(RuntimeError):
    """Outside code (an entry point, an ``--import``) failed to load; the message names it."""


# ----------------------------------------------------------------------------- entry points

_entry_points_loaded = False  # set before loading, so that a lookup during the loading does not recurse
_entry_point_failure: OutsideCodeError | None = None


def load_entry_points() -> None:
    """Load every entry point of the group ``dapseg.components``, once per process (sorted by
    distribution and name, so the order does not depend on the install order). A failure is raised
    again by every later call: a registry never runs without the components a user installed."""
    global _entry_points_loaded, _entry_point_failure
    if _entry_point_failure is not None:
        raise _entry_point_failure
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (_distribution(e), e.name)):
        try:
            obj = ep.load()
            if ep.attr is not None:
                if not callable(obj):
                    raise TypeError(f"{ep.value} is not callable (an entry point names a module, or a "
                                    "function called with no arguments)")
                obj()
        except Exception as e:
            _entry_point_failure = OutsideCodeError(
                f"entry point {ep.name!r} = {ep.value!r} of distribution {_distribution(ep)!r} "
                f"(group {ENTRY_POINT_GROUP}) failed to load: {_describe(e)}"
            )
            raise _entry_point_failure from e


def reset_entry_points() -> None:
    """Forget that the entry points were loaded (or failed): the next lookup loads them again. For
    tests that install a distribution for a moment; components already registered stay registered."""
    global _entry_points_loaded, _entry_point_failure
    _entry_points_loaded, _entry_point_failure = False, None


def _distribution(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return str(dist.name) if dist is not None else "?"


# ----------------------------------------------------------------------------- --import

_imported_files: dict[Path, ModuleType] = {}


def import_components(specs: Iterable[str]) -> list[ModuleType]:
    """Import each of ``specs`` (``--import``, repeatable): a module name, or a Python file by path.

    A file is imported once per process (importing it again would register its components twice);
    its module is named after the file (``dapseg_import_<stem>_<hash of the path>``).
    """
    return [_import_one(spec) for spec in specs]


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def _import_one(spec: str) -> ModuleType:
    if not spec.strip():
        raise OutsideCodeError("--import needs a module name or a .py file, got an empty value")
    if _is_path(spec):
        return _import_file(Path(spec))
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as e:
        if e.name is not None and (spec == e.name or spec.startswith(e.name + ".")):
            raise OutsideCodeError(f"--import {spec}: no module named {e.name!r} (give an installed module, "
                                   "one on PYTHONPATH, or the path of a .py file)") from e
        raise OutsideCodeError(f"--import {spec}: {_describe(e)}") from e
    except Exception as e:
        raise OutsideCodeError(f"--import {spec}: {_describe(e)}") from e


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise OutsideCodeError(f"--import {path}: no such file")
    resolved = path.resolve()
    if resolved in _imported_files:
        return _imported_files[resolved]
    digest = hashlib.sha1(str(resolved).encode("utf-8")).hexdigest()[:10]
    stem = "".join(c if c.isalnum() else "_" for c in resolved.stem)
    name = f"dapseg_import_{stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise OutsideCodeError(f"--import {path}: not a Python file that can be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pydantic look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise OutsideCodeError(f"--import {path}: {_describe(e, resolved)}") from e
    _imported_files[resolved] = module
    return module


def _describe(e: BaseException, file: Path | None = None) -> str:
    """``Type: message``, with the line of ``file`` (else the innermost frame) where it was raised."""
    frames = traceback.extract_tb(e.__traceback__)
    if file is not None:
        frames = [f for f in frames if Path(f.filename) == file] or frames
    where = f" (at {frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {e}{where}"


# ----------------------------------------------------------------------------- presets

_presets: dict[str, dict[str, Any]] = {}


def register_preset(name: str, settings: Mapping[str, Any], *, replace: bool = False) -> None:
    """Add preset ``name``: ``settings`` as a preset YAML file would hold them (plain data; ``base:``
    may name any preset). Validated when the preset is loaded, like the presets of the package; a
    name of the package's own presets is refused there."""
    if not isinstance(name, str) or not name.strip() or name != name.strip() or "/" in name:
        raise ValueError(f"preset name {name!r} must be a non-empty name without spaces around it or '/'")
    if not isinstance(settings, Mapping) or not all(isinstance(k, str) for k in settings):
        raise ValueError(f"preset {name!r}: settings must be a mapping of setting names, got {type(settings).__name__}")
    if name in _presets and not replace:
        raise ValueError(f"preset {name!r} is already registered from outside the package")
    _presets[name] = copy.deepcopy(dict(settings))


def unregister_preset(name: str) -> None:
    """Remove outside preset ``name`` (tests clean up with this)."""
    _presets.pop(name, None)


def outside_presets() -> dict[str, dict[str, Any]]:
    """The presets added from outside the package (after loading the entry points), name -> settings."""
    load_entry_points()
    return copy.deepcopy(_presets)
