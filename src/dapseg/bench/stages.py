"""Per-stage wall-clock time of a prediction, by wrapping the functions that implement each stage.

The pipeline's own stages are lists of importable names (``module:function`` or
``module:Class.method``) in ``FUNCTION_STAGES``. A component adds its own stages in its registry
entry, the extra ``stages``: ``{stage: names}``, each name a function or ``Class.method`` of the
module the component is registered from (``component_stages``), so the bench names no component's
internals. A name is looked up where its *caller* finds it (splice's ``encode_image`` in
``dapseg.inference.splice``, not where it is defined), since a ``from x import f`` binds its own
reference. Times are *exclusive*: a stage's time excludes the stages called inside it
(``stitching`` is what ``coarse_logits`` spends outside CLIP, the VFM, the head and the components'
own stages: resizing, cropping windows, averaging overlaps).

The wrappers are installed only inside ``StageTimer`` and removed on exit, so nothing outside a
benchmark runs through them. On CUDA each boundary synchronises the device (slower, but true).
"""

from __future__ import annotations

import functools
import importlib
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from dapseg.bench.probe import synchronize
from dapseg.registry import HEADS, MASK_GENERATORS, PLUGINS, REFINERS, STRATEGIES, Entry

# stage -> the pipeline's functions whose (exclusive) time is that stage's, in the order of the table printed.
FUNCTION_STAGES: dict[str, tuple[str, ...]] = {
    "clip_blocks": (
        "dapseg.models.clip:DenseClip.tokens_before_last_block",
        "dapseg.models.clip:DenseClip.tokens_entering_blocks",  # what the engine calls since Need.CLIP_LAYERS
    ),
    "vfm": ("dapseg.models.vfm.base:VisionFoundationModel.forward",),
    "head": (
        "dapseg.inference.engine:DenseEngine.head_output",
        "dapseg.inference.engine:DenseEngine.patch_logits",
    ),
    "text": ("dapseg.api:Segmenter.text_embeddings",),
    "stitching": ("dapseg.api:Segmenter.coarse_logits",),
    "postprocess": ("dapseg.api:Segmenter.predict",),
}
# stage -> an attribute of the Segmenter *instance* (dotted: of an object it holds) that is called per
# image (closures, not importable). ``masks``: the region-mask generator, once per image.
INSTANCE_STAGES: dict[str, str] = {"masks": "models.mask_generator", "refinement": "refiner"}
# The pipeline's stages; the components' own stages come after ``head`` in the table (``stage_order``).
STAGES: tuple[str, ...] = (*FUNCTION_STAGES, *INSTANCE_STAGES)


def configured_entries(config: Any) -> list[Entry[Any]]:
    """The registry entries of the components ``config`` (a ``SegmenterConfig``) runs."""
    chosen = [(HEADS, config.head.name), (STRATEGIES, config.inference.mode),
              *((PLUGINS, p.name) for p in config.plugins), (REFINERS, config.refine.name)]
    if config.masks is not None:
        chosen.append((MASK_GENERATORS, config.masks.name))
    return [registry.get(name) for registry, name in chosen if name != registry.none_name]


def declared_stages(entry: Entry[Any]) -> dict[str, tuple[str, ...]]:
    """stage -> importable names of the component's own ``stages`` extra (in its builder's module)."""
    module = entry.builder.__module__
    return {stage: tuple(f"{module}:{name}" for name in names)
            for stage, names in entry.extras.get("stages", {}).items()}


def component_stages(config: Any) -> dict[str, tuple[str, ...]]:
    """stage -> importable names, from every component ``config`` runs (their ``stages`` extras)."""
    out: dict[str, tuple[str, ...]] = {}
    for entry in configured_entries(config):
        for stage, paths in declared_stages(entry).items():
            out[stage] = (*out.get(stage, ()), *paths)
    return out


def stage_order(names: Iterable[str]) -> list[str]:
    """``names`` (repeats dropped) in table order: the pipeline's stages up to ``head``, the
    components' own stages in the order given, then the rest of the pipeline's stages."""
    seen = list(dict.fromkeys(names))
    cut = STAGES.index("head") + 1
    return ([n for n in STAGES[:cut] if n in seen] + [n for n in seen if n not in STAGES]
            + [n for n in STAGES[cut:] if n in seen])


def resolve(path: str) -> tuple[Any, str]:
    """``module:Owner.attr`` -> (the object holding ``attr``, "attr"); ValueError when it is not there."""
    module_name, _, qualname = path.partition(":")
    if not qualname:
        raise ValueError(f"stage path {path!r} must look like 'package.module:function' or ':Class.method'")
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"stage path {path!r}: cannot import {module_name} ({e})") from e
    *parents, attr = qualname.split(".")
    for name in parents:
        owner = getattr(owner, name, None)
        if owner is None:
            raise ValueError(f"stage path {path!r}: {module_name} has no {qualname}")
    if not callable(getattr(owner, attr, None)):
        raise ValueError(f"stage path {path!r}: {module_name}.{qualname} is not a callable")
    return owner, attr


@dataclass
class _Frame:
    stage: str
    children: float = 0.0  # seconds spent in nested timed stages


@dataclass
class StageTimer:
    """Accumulates exclusive seconds per stage while active (``with timer.active(segmenter): ...``)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    unresolved: list[str] = field(default_factory=list)  # table entries that no longer resolve
    _stack: list[_Frame] = field(default_factory=list)

    def reset(self) -> None:
        self.seconds = {}
        self.calls = {}

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            synchronize(self.device)
            frame = _Frame(stage)
            self._stack.append(frame)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                synchronize(self.device)
                dt = time.perf_counter() - t0
                self._stack.pop()
                self.seconds[stage] = self.seconds.get(stage, 0.0) + dt - frame.children
                self.calls[stage] = self.calls.get(stage, 0) + 1
                if self._stack:
                    self._stack[-1].children += dt

        return timed

    @contextmanager
    def active(self, segmenter: Any | None = None) -> Iterator[StageTimer]:
        """Install the wrappers: the pipeline's functions and, with ``segmenter``, its components' declared
        stages and its per-image callables."""
        undo: list[Callable[[], None]] = []
        self.unresolved = []
        function_stages = {**FUNCTION_STAGES}
        if segmenter is not None:
            for stage, paths in component_stages(segmenter.config).items():
                function_stages[stage] = (*function_stages.get(stage, ()), *paths)
        try:
            for stage, paths in function_stages.items():
                for path in paths:
                    try:
                        owner, attr = resolve(path)
                    except ValueError:
                        self.unresolved.append(path)
                        continue
                    undo.append(_patch(owner, attr, self.wrap(stage, getattr(owner, attr))))
            if segmenter is not None:
                for stage, path in INSTANCE_STAGES.items():
                    *parents, attr = path.split(".")
                    owner = segmenter
                    for name in parents:
                        owner = getattr(owner, name, None)
                    fn = getattr(owner, attr, None) if owner is not None else None
                    if callable(fn):
                        undo.append(_patch(owner, attr, self.wrap(stage, fn)))
            yield self
        finally:
            for restore in reversed(undo):
                restore()


def _patch(owner: Any, attr: str, new: Callable[..., Any]) -> Callable[[], None]:
    """Set ``owner.attr = new``; the returned function puts back exactly what was there before."""
    own = vars(owner) if hasattr(owner, "__dict__") else {}
    had_own = attr in own
    old = own.get(attr)
    setattr(owner, attr, new)

    def restore() -> None:
        if had_own:
            setattr(owner, attr, old)
        else:
            delattr(owner, attr)

    return restore
