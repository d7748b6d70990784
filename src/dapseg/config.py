"""Typed, validated configuration and the preset registry.

A preset is a YAML file under ``dapseg/configs/presets`` (data, never executed code), or settings that
outside code added (``dapseg.extend.register_preset``, kept by ``dapseg.outside``). A preset may
name a ``base`` preset and override parts of it. Overrides from the command line or the Python API
are dotted keys (``inference.stride=112``) or, where unambiguous, bare field names (``rho=0.5``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from dapseg.outside import outside_presets
from dapseg.registry import (
    HEADS,
    MASK_GENERATORS,
    PLUGINS,
    REFINERS,
    STRATEGIES,
    VFM_FAMILIES,
    Registry,
    vfm_family_name,
)


class _Strict(BaseModel):
    # every float setting finite, as every component parameter (``registry.check_finite``)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ClipConfig(_Strict):
    model: str = "ViT-B-16"  # any open_clip ViT name
    pretrained: str = "openai"  # open_clip pretrained tag
    weights: Path | None = None  # local file: OpenAI .pt or open_clip .bin/.safetensors state dict


class VfmConfig(_Strict):
    name: str  # a name of the VFM registry (dapseg.models.vfm)
    weights: Path | None = None  # the official release file (or folder, for families released as one)
    params: dict[str, Any] = Field(default_factory=dict)  # the family's own settings, checked by its model

    @model_validator(mode="after")
    def _check_params(self) -> VfmConfig:
        self.__dict__["params"] = VFM_FAMILIES.validate(vfm_family_name(self.name), self.params)
        return self


class ComponentConfig(_Strict):
    """A registered component by name, with its ``params`` checked against the component's own
    params model (asked from the registry, so this module imports no component)."""

    _registry: ClassVar[Registry[Any]]
    name: str
    params: dict[str, Any] = Field(default_factory=dict, validate_default=True)

    @field_validator("name")
    @classmethod
    def _known_name(cls, v: str) -> str:
        if v != cls._registry.none_name:
            cls._registry.get(v)  # an unknown name fails here, at ``<section>.name``, listing the known ones
        return v

    @field_validator("params")
    @classmethod
    def _check_params(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # A field validator (not a model one): an error inside the params is reported at
        # ``<section>.params.<key>``, where the user wrote it.
        if "name" not in info.data:  # the name itself failed, and says so
            return v
        return cls._registry.validate(info.data["name"], v)


class HeadConfig(ComponentConfig):
    _registry = HEADS
    name: str = "vanilla"


class PluginConfig(ComponentConfig):
    _registry = PLUGINS


class RefineConfig(ComponentConfig):
    _registry = REFINERS
    name: str = "none"


class MasksConfig(ComponentConfig):
    """The region-mask generator (``dapseg.registry.MASK_GENERATORS``) for heads and refiners that
    declare ``Need.REGION_MASKS``; e.g. ``{name: folder, params: {root: masks/}}``."""

    _registry = MASK_GENERATORS


class InferenceConfig(_Strict):
    mode: str = "slide"  # a registered strategy (dapseg.registry.STRATEGIES)
    short_side: int | None = 336  # resize so the short side is this (None: keep the size)
    crop: int = 224  # sliding-window size (px)
    stride: int = 112  # sliding-window stride (px)
    pad_multiple: int | None = None  # zero-pad each window to a multiple of this (ProxyCLIP: 56)
    max_batch: int = 16  # windows per forward pass
    # autocast of every model (CLIP, VFM, SAM, text); auto: bf16 (fp16 without bf16) on CUDA, fp32 elsewhere
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # strategy-specific (e.g. splice affinity); checked by a field validator, so that an error is
    # reported at ``inference.params.<key>``
    params: dict[str, Any] = Field(default_factory=dict, validate_default=True)

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, v: str) -> str:
        STRATEGIES.get(v)  # an unknown mode fails here, at ``inference.mode``, listing the known ones
        return v

    @field_validator("crop", "stride", "max_batch")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("short_side")
    @classmethod
    def _short_side(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be >= 1 or null")
        return v

    @field_validator("params")
    @classmethod
    def _check_params(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "mode" not in info.data:  # the mode itself failed, and says so
            return v
        mode = info.data["mode"]
        try:
            return STRATEGIES.validate(mode, v)
        except ValueError as e:
            if v and STRATEGIES.get(mode).params is None:
                raise ValueError(f"{e} (switching from another mode? also set inference.params={{}})") from e
            raise

    @model_validator(mode="after")
    def _stride_within_crop(self) -> InferenceConfig:
        if self.stride > self.crop:  # every mode: a config must not turn invalid by switching mode
            raise ValueError(
                f"inference.stride ({self.stride}) is larger than inference.crop ({self.crop}): pixels between "
                "windows would be covered by no window; use a stride <= crop"
            )
        return self


class PostprocessConfig(_Strict):
    logit_scale: float = 40.0
    prob_thd: float = 0.0  # pixels whose top class probability is below become class 0 (background)

    @field_validator("prob_thd")
    @classmethod
    def _thd(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be in [0, 1]")
        return v


class SegmenterConfig(_Strict):
    name: str = "custom"
    description: str = ""
    clip: ClipConfig = Field(default_factory=ClipConfig)
    vfm: VfmConfig | None = None
    sam: VfmConfig | None = None  # SAM for splice-global affinity, SAM regions and prompt refinement
    head: HeadConfig = Field(default_factory=HeadConfig)
    plugins: list[PluginConfig] = Field(default_factory=list)  # at most one reworks the head (e.g. fsa)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)
    masks: MasksConfig | None = None  # region masks, computed once per image (Need.REGION_MASKS)
    templates: str = "openai_imagenet"

    @field_validator("plugins")
    @classmethod
    def _unique_plugins(cls, v: list[PluginConfig]) -> list[PluginConfig]:
        names = [p.name for p in v]
        if len(set(names)) != len(names):
            raise ValueError(f"a plug-in is listed twice: {names}")
        if len(names) > 1:
            raise ValueError(f"at most one plug-in can rework the head, got {names}")
        return v

    @model_validator(mode="after")
    def _head_takes_plugins(self) -> SegmenterConfig:
        refusal = head_refuses_plugins(self.head.name)
        if self.plugins and refusal:
            raise ValueError(f"head {self.head.name!r} takes no plug-in ({self.plugins[0].name!r} given): {refusal}")
        return self

    def plugin(self, name: str) -> PluginConfig | None:
        """The configured plug-in ``name``, or None when it is not enabled."""
        return next((p for p in self.plugins if p.name == name), None)

    def with_overrides(self, overrides: dict[str, Any] | None) -> SegmenterConfig:
        """A new, validated config with ``overrides`` applied (see ``apply_overrides``)."""
        if not overrides:
            return self
        data = self.model_dump()
        apply_overrides(data, overrides)
        return SegmenterConfig.model_validate(data)


def head_refuses_plugins(head: str) -> str | None:
    """Why head ``head`` takes no plug-in (its registry entry's ``no_plugins`` extra), or None."""
    return HEADS.get(head).extras.get("no_plugins") if head in HEADS else None


# ----------------------------------------------------------------------------- overrides

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


# ----------------------------------------------------------------------------- presets

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


def _derived_presets(raw: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Presets made from others: ``<preset>-fsa`` for every preset that has no plug-in yet (at most one
    reworks the head) and does not stitch (the stitched last block takes no plug-in)."""
    derived = {}
    for name in raw:
        if name.endswith("-fsa") or f"{name}-fsa" in raw:
            continue
        resolved = _resolve(name, raw)
        plugins = resolved.get("plugins") or []
        if resolved.get("inference", {}).get("mode") == "stitch" or plugins:
            continue
        if head_refuses_plugins((resolved.get("head") or {}).get("name", HeadConfig().name)):
            continue
        description = f"{raw[name].get('description', name)} + FSA feedback attention"
        derived[f"{name}-fsa"] = {"base": name, "plugins": [*plugins, {"name": "fsa"}], "description": description}
    return derived


def _all_raw() -> dict[str, dict[str, Any]]:
    raw = _raw_presets()
    return {**raw, **_derived_presets(raw)}


def list_presets() -> list[str]:
    return sorted(_all_raw())


def default_preset(presets: Sequence[str] | None = None) -> str:
    """`dap` when it exists (the headline method), else `naclip`, else the first preset."""
    presets = list(list_presets() if presets is None else presets)
    for name in ("dap", "naclip"):
        if name in presets:
            return name
    if not presets:
        raise ValueError("no presets found under dapseg/configs/presets")
    return presets[0]


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
