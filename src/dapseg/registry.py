"""One kind of registry for every pluggable part: heads, strategies, refiners, plug-ins, VFM families,
mask generators.

A registry maps a name to an ``Entry``: the builder, the pydantic model of its ``params`` (None: the
component takes no parameters) and what it *needs* from the rest of the pipeline (``Need``). The
configuration asks a registry for the params model (``Registry.validate``) and never imports a
component; the segmenter asks it for the declared needs and builds each component with exactly the
models it declared (see docs/design.md, "Registries and needs").

Registering from outside the package is the same call the built-ins use, through the public
module ``dapseg.extend``::

    from dapseg.extend import HEADS, Need

    @HEADS.register("mine", params=MyParams, needs={Need.VFM_FEATURES})
    class MyHead(Head): ...

The built-in components register when their module is imported; a registry imports its built-in
modules (by name, on first lookup) so that ``config.py`` can validate names without importing them,
then the installed outside components (the ``dapseg.components`` entry points, ``dapseg.outside``).

This module imports only ``dapseg.outside`` (which imports nothing from the package): it is the
lowest layer with ``config.py``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from dapseg.outside import load_entry_points

T = TypeVar("T")


class Need(str, Enum):
    """What a component may need from the pipeline, declared rather than probed."""

    VFM_FEATURES = "vfm_features"  # HeadContext.vfm_feats: the VFM's patch features of each window
    VFM_ATTENTION = "vfm_attention"  # HeadContext.vfm_attn: the VFM's last-layer attention
    WINDOW_PIXELS = "window_pixels"  # HeadContext.images: the window pixels in [0, 1]
    SAM_ENCODER = "sam_encoder"  # the configured SAM's image encoder (builder keyword ``sam_encoder``)
    SAM_DECODER = "sam_decoder"  # a full segment-anything ``Sam`` with its decoder (``sam_decoder``)
    BACKBONE = "backbone"  # the names of the CLIP model and the VFM (``backbone``: a ``Backbone``)
    CLASS_TEXT = "class_text"  # the query text embeddings at run time (e.g. FSA)
    AFFINITY_MEAN = "affinity_mean"  # HeadContext.affinity_mean: mean(S) over every window of the image
    ORIGINAL_IMAGE = "original_image"  # the image as loaded, keyword ``original`` of a strategy call
    CLIP_LAYERS = "clip_layers"  # HeadContext.layers / .blocks: the tokens entering every CLIP block
    # HeadContext.region_masks / RefineInput.region_masks: the image's region map from the configured
    # mask generator (a `masks:` section is then required)
    REGION_MASKS = "region_masks"


# Needs handed to a builder as keyword arguments (the others configure the engine at run time).
BUILDER_NEEDS = (Need.SAM_ENCODER, Need.SAM_DECODER, Need.BACKBONE)

NeedsSpec = Iterable[Need | str] | Callable[[Any], Iterable[Need | str]]


@dataclass(frozen=True)
class Backbone:
    """What a component may know about the models around it (``Need.BACKBONE``)."""

    clip_model: str  # open_clip model name, e.g. "ViT-B-16"
    vfm_name: str | None = None  # VFM registry name, e.g. "mae_vitb16"
    vfm_family: str | None = None  # VFM family, e.g. "mae" (for reports: components read traits, not names)
    clip_patch_size: int = 16  # pixels per CLIP patch
    vfm_fsa_lambda: float | None = None  # the FSA λ the VFM's family asks for (None: none)


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered component."""

    kind: str
    name: str
    builder: Callable[..., T]
    params: type[BaseModel] | None = None
    needs: NeedsSpec = field(default_factory=frozenset)
    description: str = ""
    # What other parts of the pipeline look up about the component, by key (e.g. a strategy's
    # ``windows`` plan or a head's ``no_plugins`` reason; docs/design.md, "Extras").
    extras: Mapping[str, Any] = field(default_factory=dict)

    def parse_params(self, params: Mapping[str, Any] | BaseModel | None) -> BaseModel | None:
        """The validated params object; a component without a params model accepts none."""
        if isinstance(params, BaseModel):
            check_finite(params)
            return params
        if self.params is None:
            if params:
                raise ValueError(f"{self.kind} {self.name!r} takes no params, got {sorted(params)}")
            return None
        p = self.params(**(params or {}))
        check_finite(p)
        return p

    def needs_for(self, params: Mapping[str, Any] | BaseModel | None = None) -> frozenset[Need]:
        """The needs of this component with ``params`` (some needs depend on a parameter)."""
        needs = self.needs(self.parse_params(params)) if callable(self.needs) else self.needs
        return frozenset(Need(n) for n in needs)

    def build(self, params: Mapping[str, Any] | BaseModel | None = None, **provided: Any) -> T:
        """Call the builder with the params object (when it has a params model) and, as keywords, the
        provided models of the needs it declared (``BUILDER_NEEDS``); other provided items are dropped."""
        p = self.parse_params(params)
        declared = {n.value for n in self.needs_for(p) if n in BUILDER_NEEDS}
        kwargs = {k: v for k, v in provided.items() if k in declared}
        return self.builder(p, **kwargs) if self.params is not None else self.builder(**kwargs)


def check_finite(params: BaseModel, where: str = "") -> None:
    """One rule for every float parameter of every component: finite (no nan, inf or -inf), unless its
    field says otherwise with ``Field(allow_inf_nan=True)``. Looks into nested models, lists, tuples
    and dicts; ``ValueError`` names the parameter. Applied by ``Entry.parse_params`` to every params
    object, so a component registered from outside gets the rule without writing it."""
    for name, info in type(params).model_fields.items():
        if not any(getattr(m, "allow_inf_nan", None) is True for m in info.metadata):
            _check_finite_value(getattr(params, name), f"{where}{name}")


def _check_finite_value(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} = {value}: must be a finite number (nan and infinity are not allowed)")
    if isinstance(value, BaseModel):
        check_finite(value, f"{where}.")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_finite_value(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite_value(v, f"{where}.{k}")


class Registry(Generic[T]):
    """Name -> ``Entry`` for one kind of component (``kind`` names it in messages)."""

    def __init__(self, kind: str, builtins: Iterable[str] = (), none_name: str | None = None) -> None:
        self.kind = kind
        self._builtins = tuple(builtins)  # modules that register the built-in components
        self._loaded = not self._builtins
        self._entries: dict[str, Entry[T]] = {}
        self.none_name = none_name  # a name meaning "no component" (e.g. refine: none)

    def register(
        self,
        name: str,
        *,
        params: type[BaseModel] | None = None,
        needs: NeedsSpec = frozenset(),
        description: str = "",
        replace: bool = False,
        extras: Mapping[str, Any] | None = None,
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering ``builder`` (a class or a function) under ``name``."""

        def deco(builder: Callable[..., T]) -> Callable[..., T]:
            self.add(Entry(self.kind, name, builder, params, needs, description, dict(extras or {})), replace=replace)
            return builder

        return deco

    def attach(self, name: str, **extras: Any) -> None:
        """Add ``extras`` to the entry of ``name``: the component's own module, after its class is
        defined (e.g. corrclip's ``no_plugins``, dap's ``stages``)."""
        entry = self.get(name)
        self._entries[name] = dataclasses.replace(entry, extras={**entry.extras, **extras})

    def add(self, entry: Entry[T], *, replace: bool = False) -> None:
        if not entry.name or entry.name == self.none_name:
            raise ValueError(f"{self.kind} name {entry.name!r} is reserved")
        old = self._entries.get(entry.name)
        if old is not None and not replace and old.builder is not entry.builder:
            raise ValueError(f"{self.kind} {entry.name!r} is already registered (by {_origin(old.builder)})")
        self._entries[entry.name] = entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register toy components clean up with this)."""
        self._entries.pop(name, None)

    def _load_builtins(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._builtins:
                importlib.import_module(module)
        load_entry_points()  # the installed outside components (once per process; see dapseg.outside)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        self._load_builtins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._entries

    def get(self, name: str) -> Entry[T]:
        """The entry of ``name``; ValueError listing the known names otherwise."""
        self._load_builtins()
        try:
            return self._entries[name]
        except KeyError:
            known = ([self.none_name] if self.none_name else []) + sorted(self._entries)
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(known)}") from None

    def validate(self, name: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """``params`` of ``name`` checked against its model, as a plain dict with defaults filled in."""
        if self.none_name is not None and name == self.none_name:
            return {}  # "no component": its params are dropped, so a sweep can switch a refiner off
        p = self.get(name).parse_params(params)
        return p.model_dump() if p is not None else {}

    def build(self, name: str, params: Mapping[str, Any] | BaseModel | None = None, **provided: Any) -> T:
        return self.get(name).build(params, **provided)


def _origin(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"


HEADS: Registry[Any] = Registry(
    "head",
    builtins=[
        f"dapseg.heads.{m}"
        for m in ("vanilla", "maskclip", "sclip", "naclip", "proxy", "dap", "pearl", "scclip", "corrclip")
    ],
)
STRATEGIES: Registry[Any] = Registry(
    "inference mode",
    builtins=["dapseg.inference.strategies", "dapseg.inference.splice", "dapseg.inference.stitch"],
)
REFINERS: Registry[Any] = Registry(
    "refiner",
    builtins=["dapseg.refine.pamr", "dapseg.refine.sam_prompt", "dapseg.refine.sam_vote", "dapseg.refine.pearl_prop",
              "dapseg.refine.map_correction"],
    none_name="none",
)
PLUGINS: Registry[Any] = Registry("plug-in", builtins=["dapseg.plugins.fsa"])
MASK_GENERATORS: Registry[Any] = Registry(
    "mask generator", builtins=[f"dapseg.masks.{m}" for m in ("folder", "sam", "sam2", "mask2former", "eomt")]
)
VFM_FAMILIES: Registry[Any] = Registry(
    "VFM family", builtins=[f"dapseg.models.vfm.{m}" for m in ("dino", "dinov2", "dinov3", "mae", "sam", "sd")]
)


def vfm_family_name(vfm_name: str) -> str:
    """The VFM family offering VFM ``vfm_name`` (one of its ``specs``); ValueError listing the valid names."""
    owners = {spec.name: family for family in VFM_FAMILIES.names() for spec in VFM_FAMILIES.build(family).specs}
    if vfm_name not in owners:
        raise ValueError(f"unknown VFM {vfm_name!r}; valid names: {', '.join(owners)}")
    return owners[vfm_name]


def all_registries() -> dict[str, Registry[Any]]:
    """Every registry by its section name (what the CLI and the contract tests iterate over)."""
    return {"head": HEADS, "strategy": STRATEGIES, "refiner": REFINERS, "plugin": PLUGINS,
            "vfm_family": VFM_FAMILIES, "mask_generator": MASK_GENERATORS}
