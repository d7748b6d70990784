"""Typed, validated configuration: the schema, overrides and the preset store.

``schema`` holds the config's sections (pydantic models whose component ``params`` the registries
check), ``overrides`` applies dotted ``key=value`` settings, ``presets`` reads the package's preset
files (and the presets derived from them) and users' config files. Everything is re-exported here:
``from dapseg.config import load_preset, SegmenterConfig`` is the public path.
"""

from dapseg.config.overrides import apply_overrides, parse_override, parse_value
from dapseg.config.presets import default_preset, list_presets, load_config_file, load_preset
from dapseg.config.schema import (
    ClipConfig,
    ComponentConfig,
    HeadConfig,
    InferenceConfig,
    MasksConfig,
    PluginConfig,
    PostprocessConfig,
    RefineConfig,
    SegmenterConfig,
    VfmConfig,
    head_refuses_plugins,
    refuses_plugins,
)

__all__ = [
    "ClipConfig",
    "ComponentConfig",
    "HeadConfig",
    "InferenceConfig",
    "MasksConfig",
    "PluginConfig",
    "PostprocessConfig",
    "RefineConfig",
    "SegmenterConfig",
    "VfmConfig",
    "apply_overrides",
    "default_preset",
    "head_refuses_plugins",
    "list_presets",
    "load_config_file",
    "load_preset",
    "parse_override",
    "parse_value",
    "refuses_plugins",
]
