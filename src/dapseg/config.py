"""Typed, validated configuration and the preset registry.

A preset is a YAML file under ``dapseg/configs/presets`` (data, never executed code). A preset may
name a ``base`` preset and override parts of it. Overrides from the command line or the Python API
are dotted keys (``inference.stride=112``) or, where unambiguous, bare field names (``rho=0.5``).
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClipConfig(_Strict):
    model: str = "ViT-B-16"  # any open_clip ViT name
    pretrained: str = "openai"  # open_clip pretrained tag
    weights: Path | None = None  # local file: OpenAI .pt or open_clip .bin/.safetensors state dict


class VfmConfig(_Strict):
    name: str  # a name of the VFM registry (dapseg.models.vfm)
    weights: Path | None = None  # the official release file


class HeadConfig(_Strict):
    name: str = "vanilla"
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_params(self) -> HeadConfig:
        from dapseg.heads.base import head_class

        cls = head_class(self.name)
        params_model = getattr(cls, "Params", None)
        if params_model is not None:
            self.__dict__["params"] = params_model(**self.params).model_dump()
        elif self.params:
            raise ValueError(f"head {self.name!r} takes no parameters, got {sorted(self.params)}")
        return self


class FsaConfig(_Strict):
    enabled: bool = False
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("params")
    @classmethod
    def _check_params(cls, v: dict[str, Any]) -> dict[str, Any]:
        from dapseg.plugins.fsa import FsaParams

        FsaParams(**v)  # unknown names and out-of-range values fail at config time
        return v


class InferenceConfig(_Strict):
    mode: Literal["whole", "slide", "splice", "stitch"] = "slide"
    short_side: int | None = 336  # resize so the short side is this (None: keep the size)
    crop: int = 224  # sliding-window size (px)
    stride: int = 112  # sliding-window stride (px)
    pad_multiple: int | None = None  # zero-pad each window to a multiple of this (ProxyCLIP: 56)
    max_batch: int = 16  # windows per forward pass
    params: dict[str, Any] = Field(default_factory=dict)  # strategy-specific (e.g. splice affinity)

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

    @model_validator(mode="after")
    def _check_params(self) -> InferenceConfig:
        if self.stride > self.crop:  # every mode: a config must not turn invalid by switching mode
            raise ValueError(
                f"inference.stride ({self.stride}) is larger than inference.crop ({self.crop}): pixels between "
                "windows would be covered by no window; use a stride <= crop"
            )
        if self.mode != "slide" or self.params:  # slide/whole take none: skip importing the engine
            from dapseg.inference.strategies import validate_strategy_params

            self.__dict__["params"] = validate_strategy_params(self.mode, self.params)
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


class RefineConfig(_Strict):
    name: Literal["none", "pamr", "sam", "sam_vote"] = "none"
    params: dict[str, Any] = Field(default_factory=dict)


class SegmenterConfig(_Strict):
    name: str = "custom"
    description: str = ""
    clip: ClipConfig = Field(default_factory=ClipConfig)
    vfm: VfmConfig | None = None
    sam: VfmConfig | None = None  # SAM for splice-global affinity and prompt refinement
    head: HeadConfig = Field(default_factory=HeadConfig)
    fsa: FsaConfig = Field(default_factory=FsaConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)
    templates: str = "openai_imagenet"

    def with_overrides(self, overrides: dict[str, Any] | None) -> SegmenterConfig:
        """A new, validated config with ``overrides`` applied (see ``apply_overrides``)."""
        if not overrides:
            return self
        data = self.model_dump()
        apply_overrides(data, overrides)
        return SegmenterConfig.model_validate(data)


# ----------------------------------------------------------------------------- overrides

_SECTIONS_WITH_PARAMS = ("head", "inference", "fsa", "refine")


def _resolve_key(data: dict[str, Any], key: str) -> list[str]:
    """Dotted path for an override key. Bare names are looked up in every section."""
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
    if len(hits) == 1:
        return hits[0]
    if not hits:
        # A head / refiner parameter that has its default only in the Params model is not in
        # the dump; let the head's params take it so validation names it if it is wrong.
        raise KeyError(f"unknown setting {key!r}; use a dotted key such as head.params.{key}")
    raise KeyError(f"setting {key!r} is ambiguous: {', '.join('.'.join(h) for h in hits)}")


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Set each (possibly dotted) key of ``overrides`` in the nested ``data`` dict, in place."""
    for key, value in overrides.items():
        path = _resolve_key(data, key)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[path[-1]] = value


def parse_value(text: str) -> Any:
    """A command-line value parsed as YAML: "0.5" -> 0.5, "none" stays a string, "null" -> None, "[8, 16]" -> a list."""
    return yaml.safe_load(text)


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value' -> (key, parsed value)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key=value")
    key, value = text.split("=", 1)
    return key.strip(), parse_value(value.strip())


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
    return presets


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
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
    """Presets made from others: ``<preset>-fsa`` for every preset that has no FSA yet (and does not
    stitch: the stitched last block takes no plug-in)."""
    derived = {}
    for name in raw:
        stitched = _resolve(name, raw).get("inference", {}).get("mode") == "stitch"
        if not name.endswith("-fsa") and f"{name}-fsa" not in raw and not stitched:
            description = f"{raw[name].get('description', name)} + FSA feedback attention"
            derived[f"{name}-fsa"] = {"base": name, "fsa": {"enabled": True}, "description": description}
    return derived


def _all_raw() -> dict[str, dict[str, Any]]:
    raw = _raw_presets()
    return {**raw, **_derived_presets(raw)}


def list_presets() -> list[str]:
    return sorted(_all_raw())


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
