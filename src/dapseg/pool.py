"""Built segmenters shared across requests: the web demo and evaluation use the same pool.

``SegmenterPool.base(name)`` builds a preset's segmenter once (weights loaded once);
``get(name, overrides)`` derives a segmenter with config overrides that shares the preset's modules
(``Segmenter.derive``), so a settings change never reloads weights. Both levels are small LRU
caches; evicting a preset drops its derived segmenters with it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SegmenterPool:
    """Segmenters by preset name (``build(name)`` makes one) and by overrides of a preset."""

    build: Callable[[str], Any]
    capacity: int = 2  # presets with their weights in memory
    derived_capacity: int = 4  # settings per preset (cheap: modules are shared)
    _models: OrderedDict[str, Any] = field(default_factory=OrderedDict)
    _derived: OrderedDict[tuple[str, str], Any] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    builds: int = 0  # segmenters built from scratch (the demo's status line says when that happened)

    def base(self, name: str) -> Any:
        with self._lock:
            return self._base(name)

    def _base(self, name: str) -> Any:
        if name in self._models:
            self._models.move_to_end(name)
            return self._models[name]
        seg = self.build(name)
        self.builds += 1
        self._models[name] = seg
        while len(self._models) > self.capacity:
            evicted, _ = self._models.popitem(last=False)
            for key in [k for k in self._derived if k[0] == evicted]:
                del self._derived[key]
        return seg

    def get(self, name: str, overrides: dict[str, Any]) -> Any:
        """Preset ``name`` with ``overrides``; the preset's own segmenter when they change nothing."""
        with self._lock:
            base = self._base(name)
            config = base.config.with_overrides(overrides)
            if config == base.config:
                return base
            key = (name, config.model_dump_json())  # the resolved settings, whatever keys said them
            if key in self._derived:
                self._derived.move_to_end(key)
                return self._derived[key]
            seg = base.derive(overrides)
            self._derived[key] = seg
            per_preset = [k for k in self._derived if k[0] == name]
            for old in per_preset[: max(0, len(per_preset) - self.derived_capacity)]:
                del self._derived[old]
            return seg
