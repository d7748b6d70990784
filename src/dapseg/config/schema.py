"""The config schema: typed, validated sections of a ``SegmenterConfig``.

Every component section names a registered component and has its ``params`` checked by the
component's own params model, asked from the registry (so this module imports no component).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from dapseg.config.overrides import apply_overrides
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
    # the dtype the models hold their weights in and run at (dapseg.precision); auto: bf16 (fp16 without
    # bf16) on CUDA, fp32 on a CPU
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
    def _components_take_plugins(self) -> SegmenterConfig:
        for what, registry, name in (("head", HEADS, self.head.name), ("inference.mode", STRATEGIES,
                                                                       self.inference.mode)):
            refusal = refuses_plugins(registry, name)
            if self.plugins and refusal:
                raise ValueError(f"{what} {name!r} takes no plug-in ({self.plugins[0].name!r} given): {refusal}")
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


def refuses_plugins(registry: Registry[Any], name: str) -> str | None:
    """Why component ``name`` of ``registry`` takes no plug-in (the ``no_plugins`` extra of its entry:
    its reason), or None (also for an unknown name, which fails elsewhere naming the known ones)."""
    return registry.get(name).extras.get("no_plugins") if name in registry else None


def head_refuses_plugins(head: str) -> str | None:
    """Why head ``head`` takes no plug-in, or None."""
    return refuses_plugins(HEADS, head)
