"""The backend's work: a /predict request -> one prediction (or one error) per task, in task order.

The models live on one thread (``model_thread``): images are segmented one at a time in arrival order,
each image's windows batched by ``inference.max_batch`` (strategies take one image; images of
different tasks are not batched together). While the model works, the next images are downloaded
and decoded on other threads, at most ``prefetch`` images in memory at once. A request's tasks beyond
``max_tasks`` and a task whose image cannot be read or segmented get an error entry naming the task
(Label Studio logs it and stores the other tasks' predictions); more than ``max_pending`` tasks in
flight over all requests is refused as busy.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from dapseg.serve.label_config import BrushTarget, LabelConfigError, brush_targets
from dapseg.serve.media import MediaError, MediaReader
from dapseg.serve.prediction import BrushPredictor, brush_results

log = logging.getLogger("dapseg.serve")

CONFIG_CACHE = 16  # parsed labeling configs kept (one per project, usually)


class Busy(RuntimeError):
    """Too many tasks in flight; Label Studio may ask again later."""


@dataclass(frozen=True)
class ServiceLimits:
    max_tasks: int = 32  # tasks predicted per request; the rest get an error entry
    max_classes: int = 255  # labels per BrushLabels control
    max_body_bytes: int = 16 << 20  # a request's JSON
    max_pending: int = 256  # tasks in flight over all requests
    prefetch: int = 2  # images read ahead of the model (in memory at once)

    def __post_init__(self) -> None:
        for name in ("max_tasks", "max_classes", "max_body_bytes", "max_pending", "prefetch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


class BackendService:
    def __init__(self, predictor: BrushPredictor, reader: MediaReader, limits: ServiceLimits) -> None:
        self.predictor = predictor
        self.reader = reader
        self.limits = limits
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dapseg-model")
        self._ahead = asyncio.Semaphore(limits.prefetch)
        self._pending = 0
        self._configs: OrderedDict[str, list[BrushTarget]] = OrderedDict()

    @property
    def model_version(self) -> str:
        return self.predictor.model_version

    def targets(self, label_config: str) -> list[BrushTarget]:
        """The config's brush targets, their class lists checked against the classes file (cached)."""
        if label_config in self._configs:
            self._configs.move_to_end(label_config)
            return self._configs[label_config]
        targets = brush_targets(label_config, self.limits.max_classes)
        for target in targets:
            self.predictor.prompts.class_set(target.labels)
        self._configs[label_config] = targets
        if len(self._configs) > CONFIG_CACHE:
            self._configs.popitem(last=False)
        return targets

    async def predict(self, tasks: list[Any], label_config: str) -> list[dict[str, Any]]:
        """One entry per task: a prediction, or ``{"error": ...}`` for a task that failed alone.
        A bad labeling config raises ``LabelConfigError``; too much work in flight raises ``Busy``."""
        targets = self.targets(label_config)
        taken = tasks[: self.limits.max_tasks]
        if self._pending + len(taken) > self.limits.max_pending:
            raise Busy(f"{self._pending} tasks are in progress; {len(taken)} more would pass the limit of "
                       f"{self.limits.max_pending} (--max-pending); ask again later")
        self._pending += len(taken)
        try:
            entries = list(await asyncio.gather(*(self._predict_task(task, targets) for task in taken)))
        finally:
            self._pending -= len(taken)
        for task in tasks[len(taken):]:
            entries.append(self._error(task, f"not predicted: the request has {len(tasks)} tasks, more than the "
                                       f"server's {self.limits.max_tasks} per request (--max-tasks); ask "
                                       "again for the rest"))
        return entries

    async def _predict_task(self, task: Any, targets: list[BrushTarget]) -> dict[str, Any]:
        what = _task_name(task)
        try:
            data = task.get("data") if isinstance(task, dict) else None
            if not isinstance(data, dict):
                raise MediaError(f"{what}: no \"data\" object")
            loop = asyncio.get_running_loop()
            results: list[dict[str, Any]] = []
            scores = []
            async with self._ahead:  # at most `prefetch` images read, waiting or being segmented
                images: dict[str, np.ndarray] = {}
                for target in targets:
                    if target.data_key not in data:
                        raise MediaError(f"{what}: no field {target.data_key!r} in its data (the Image "
                                         f"{target.to_name!r} reads ${target.data_key})")
                    if target.data_key not in images:
                        images[target.data_key] = await self.reader.read(data[target.data_key], what)
                    segmented = await loop.run_in_executor(self.model_thread, self.predictor.segment,
                                                           images[target.data_key], target)
                    results += await asyncio.to_thread(brush_results, segmented, target)
                    scores.append(segmented.score)
            return {"result": results, "score": float(np.mean(scores)), "model_version": self.model_version}
        except (MediaError, LabelConfigError) as e:
            return self._error(task, str(e), named=True)
        except Exception as e:  # one task fails alone; the others of the request are still predicted
            log.exception("%s failed", what)
            return self._error(task, f"{type(e).__name__}: {e}")

    def _error(self, task: Any, message: str, named: bool = False) -> dict[str, Any]:
        text = message if named else f"{_task_name(task)}: {message}"
        log.warning("%s", text)
        # No "result" key: Label Studio logs the entry and stores no prediction for the task, so asking
        # again later predicts it.
        return {"error": text, "model_version": self.model_version}

    async def close(self) -> None:
        await self.reader.close()
        self.model_thread.shutdown(wait=False, cancel_futures=True)


def _task_name(task: Any) -> str:
    task_id = task.get("id") if isinstance(task, dict) else None
    return f"task {task_id}" if isinstance(task_id, (int, str)) else "a task without an id"
