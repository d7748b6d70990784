"""The public extension surface: everything outside code needs to add a head, a strategy, a refiner, a
plug-in, a VFM family, a mask generator or a preset, from one module.

A component registers on its registry when its module is imported::

    from pydantic import BaseModel, ConfigDict
    from dapseg.extend import HEADS, Attention, Head, HeadContext, Need, qkv

    class MyParams(BaseModel):
        model_config = ConfigDict(extra="forbid")  # unknown parameters are errors
        weight: float = 0.5

    @HEADS.register("mine", params=MyParams, needs={Need.VFM_FEATURES})
    class MyHead(Head):
        def __init__(self, params: MyParams) -> None:
            super().__init__()
            self.params = params

        def attention(self, ctx: HeadContext) -> Attention: ...

What each registry's builder returns (the contracts are in docs/design.md, "Contracts"):

=================== ==========================================================================
``HEADS``           a ``Head`` (most implement ``attention(ctx) -> Attention``; a head that runs in
                    ``inference.mode: stitch`` also implements ``stitched(block, StitchedTokens,
                    chunk)``, applying its attention ``chunk`` rows at a time with ``rows_times``)
``STRATEGIES``      ``strategy(engine: DenseEngine, image01 (3, H, W), text (Q, E), settings:
                    InferenceConfig) -> logits (Q, H, W)``; ``STRATEGIES.build("whole")`` gives a
                    built-in one to compose with; its ``windows`` extra, a planner returning a
                    ``WindowPlan``, tells ``dapseg bench`` how many windows it cuts
``REFINERS``        ``refiner(RefineInput) -> Refined``
``PLUGINS``         ``plugin(head, ctx: HeadContext, text (Q, E), to_embed) -> HeadOutput``
``VFM_FAMILIES``    a ``VfmFamily``, registered with ``register_family``: specs (``VfmSpec``:
                    name, patch size, normalisation), ``make_module`` building a
                    ``VisionFoundationModel`` whose ``encode`` returns ``VfmOutput``
``MASK_GENERATORS`` built as ``builder(params, build=MaskBuild(...))``, returns
                    ``generator(image (H, W, 3) uint8, *, name) -> region map (H, W) int64``
=================== ==========================================================================

``register_preset(name, settings)`` adds a preset (plain data, as a preset YAML file holds).

How the package finds outside code (``dapseg.outside``): an installed distribution's entry points in
the group ``dapseg.components`` are loaded before the first registry lookup and before every CLI
command; ``dapseg COMMAND --import MODULE_OR_FILE`` imports a module or a ``.py`` file first (for
example ``dapseg segment --import mine.py --preset mine``). Both run the outside code as Python: the
user's explicit choice; nothing else the package reads runs code.

Importing this module builds no model and imports neither open_clip nor timm: ``DenseEngine``,
``HeadPlugin`` and ``Strategy`` (types of the engine, which imports CLIP) load on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dapseg.config import InferenceConfig
from dapseg.heads.base import Attention, Head, HeadContext, HeadOutput, attend, merge_heads, qkv, split_heads
from dapseg.heads.stitched import StitchedTokens, rows_times
from dapseg.inference.windows import WindowPlan
from dapseg.masks.base import PAD_SENTINEL, MaskBuild, MaskGenerator, check_region_map
from dapseg.models.vfm.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FamilyTraits,
    NoWeights,
    VfmFamily,
    VfmOutput,
    VfmSpec,
    VisionFoundationModel,
    WeightsSource,
    register_family,
    specs_from,
)
from dapseg.outside import ENTRY_POINT_GROUP, OutsideCodeError, import_components, register_preset, unregister_preset
from dapseg.refine import Refined, RefineInput, Refiner
from dapseg.registry import (
    HEADS,
    MASK_GENERATORS,
    PLUGINS,
    REFINERS,
    STRATEGIES,
    VFM_FAMILIES,
    Backbone,
    Entry,
    Need,
    Registry,
    check_finite,
)

if TYPE_CHECKING:
    from dapseg.inference.engine import DenseEngine, HeadPlugin
    from dapseg.inference.strategies import Strategy

__all__ = [
    "ENTRY_POINT_GROUP",
    "HEADS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MASK_GENERATORS",
    "PAD_SENTINEL",
    "PLUGINS",
    "REFINERS",
    "STRATEGIES",
    "VFM_FAMILIES",
    "Attention",
    "Backbone",
    "DenseEngine",
    "Entry",
    "FamilyTraits",
    "Head",
    "HeadContext",
    "HeadOutput",
    "HeadPlugin",
    "InferenceConfig",
    "MaskBuild",
    "MaskGenerator",
    "Need",
    "NoWeights",
    "OutsideCodeError",
    "RefineInput",
    "Refined",
    "Refiner",
    "Registry",
    "StitchedTokens",
    "Strategy",
    "VfmFamily",
    "VfmOutput",
    "VfmSpec",
    "VisionFoundationModel",
    "WeightsSource",
    "WindowPlan",
    "attend",
    "check_finite",
    "check_region_map",
    "import_components",
    "merge_heads",
    "qkv",
    "register_family",
    "register_preset",
    "rows_times",
    "specs_from",
    "split_heads",
    "unregister_preset",
]


def __getattr__(name: str) -> Any:
    """The engine's types, imported on first access (the engine imports open_clip and timm)."""
    if name in ("DenseEngine", "HeadPlugin"):
        from dapseg.inference import engine

        return getattr(engine, name)
    if name == "Strategy":
        from dapseg.inference import strategies

        return strategies.Strategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
