"""torch.distributed plumbing: works unchanged under ``torchrun`` (any number of nodes) and alone."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device: str | None = None) -> DistInfo:
    """Join the process group that torchrun describes in the environment (no-op when run alone).

    Backend: nccl when this rank uses a CUDA device, gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def shard(indices: list[int], info: DistInfo) -> list[int]:
    """Round-robin: every index on exactly one rank; neighbouring (similar-sized) images spread out."""
    return indices[info.rank :: info.world_size]


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``t`` over ranks (returned on t's device); ``t`` itself is left unchanged."""
    if not info.enabled:
        return t.clone()
    backend = dist.get_backend()
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    buf = t.to(dev, copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: object, info: DistInfo) -> list[object]:
    if not info.enabled:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


class MainRankError(RuntimeError):
    """Raised on the other ranks when rank 0's part of ``on_main`` failed (rank 0 raises the original)."""


def on_main(fn: Callable[[], T], info: DistInfo) -> T:
    """``fn()`` run on rank 0 only; its value on every rank. When it fails, rank 0 raises the error and
    every other rank a ``MainRankError`` with its message, instead of waiting for a value forever."""
    if not info.enabled:
        return fn()
    value: object = None
    error: str | None = None
    if info.is_main:
        try:
            value = fn()
        except Exception as e:
            broadcast_object((None, f"{type(e).__name__} on rank 0: {e}"), info)
            raise
    value, error = broadcast_object((value, None), info)  # type: ignore[misc]
    if error is not None:
        raise MainRankError(error)
    return value  # type: ignore[return-value]
