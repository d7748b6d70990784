"""Decoding images ahead of the model, in input order: the pipelining of ``Segmenter.predict_many``
and of ``dapseg segment``.

With ``workers > 0`` the images are decoded in DataLoader worker processes (each ``ahead`` images
ahead, dying with their owner, see ``dapseg.workers``); with ``workers == 0`` one background thread
decodes up to ``ahead`` images ahead (PIL and numpy release the GIL while decoding), which also
works for in-memory images that should not be copied into other processes.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dapseg.images import load_image, pixel_limit
from dapseg.workers import die_with_parent

ImageSource = str | os.PathLike[str] | Image.Image | np.ndarray


@dataclass(frozen=True)
class Decoded:
    """Input ``index``'s image (H, W, 3) uint8, or why it could not be read (the error names the file)."""

    index: int
    image: np.ndarray | None
    error: Exception | None = None


def decode(index: int, source: ImageSource, max_pixels: int | None = None) -> Decoded:
    try:
        return Decoded(index, load_image(source, max_pixels=max_pixels))
    except (OSError, ValueError) as e:  # missing, unreadable, corrupt, too large: reported per image
        return Decoded(index, None, e)


class _Sources(Dataset[Decoded]):
    def __init__(self, sources: Sequence[ImageSource], max_pixels: int | None) -> None:
        self.sources = sources
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> Decoded:
        return decode(index, self.sources[index], self.max_pixels)


def _as_is(item: Decoded) -> Decoded:  # the DataLoader must not turn arrays into tensors
    return item


def decode_ahead(sources: Sequence[ImageSource], *, workers: int = 0, ahead: int = 2,
                 max_pixels: int | None = None) -> Iterator[Decoded]:
    """Every source decoded, yielded in input order while the next ones are being decoded; an image
    above the pixel limit (``images.pixel_limit(max_pixels)``) comes back as its error, not decoded."""
    if workers < 0 or ahead < 1:
        raise ValueError(f"need workers >= 0 and ahead >= 1 (got workers={workers}, ahead={ahead})")
    if not sources:
        return
    if workers == 0:
        yield from _decode_in_thread(sources, ahead, max_pixels)
        return
    # the limit travels with the dataset: a worker started by spawn does not inherit set_pixel_limit
    loader = DataLoader(_Sources(sources, pixel_limit(max_pixels) or 0), batch_size=None,
                        num_workers=min(workers, len(sources)),
                        prefetch_factor=ahead, collate_fn=_as_is, worker_init_fn=die_with_parent())
    yield from loader


def _decode_in_thread(sources: Sequence[ImageSource], ahead: int, max_pixels: int | None) -> Iterator[Decoded]:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dapseg-decode")
    pending: deque[Future[Decoded]] = deque()
    try:
        for i, source in enumerate(sources):
            pending.append(pool.submit(decode, i, source, max_pixels))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # also when the consumer stops early: queued decodes are dropped
        pool.shutdown(wait=False, cancel_futures=True)
