"""Stitched tokens: what a head gets in ``inference.mode: stitch``, and the contract it meets there.

The ``stitch`` strategy (``inference/stitch.py``) runs blocks 1..L-1 (and the VFM) per window and
averages the windows' tokens onto one token grid of the whole image. The last block then runs once
over all of them: by the head's *stitched form*, its method ``stitched(block, tokens, chunk)``. A
head without that method (``Head.stitched is None``) does not run in stitch mode.

A stitched form computes the head's own formula with the same code as its windowed ``attention``
(the image is one window, ``StitchedTokens.context``), but applies the attention ``chunk`` rows at a
time (``rows_times``), so memory grows as heads · chunk · N, never N².

Shapes: N = gh·gw stitched CLIP patches, D CLIP width, N' = gh'·gw' stitched VFM patches, C' VFM width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

from dapseg.heads.base import HeadContext, attend
from dapseg.registry import HEADS, Need

if TYPE_CHECKING:
    from dapseg.heads.base import Head


@dataclass
class StitchedTokens:
    """The whole image's tokens after the windows were stitched."""

    x: Tensor  # (1 + N, D) tokens entering the last CLIP block, CLS first (the windows' CLS averaged)
    grid: tuple[int, int]  # (gh, gw) CLIP patch grid of the image
    vfm_feats: Tensor | None = None  # (C', gh', gw') VFM features of the image (stitched the same way)
    image: Tensor | None = None  # (3, H, W) the processed image in [0, 1] (for heads that look at pixels)
    window_area: int = 0  # pixels of one window (a head may scale its per-window counts with it)

    def context(self, block: nn.Module) -> HeadContext:
        """The image as one window: a ``HeadContext`` with a batch of 1 for the head's own code."""
        return HeadContext(x=self.x[None], grid=self.grid, block=block,
                           vfm_feats=None if self.vfm_feats is None else self.vfm_feats[None],
                           images=None if self.image is None else self.image[None])


# A head's stitched form, as a bound method: (last CLIP block, stitched tokens, rows per chunk)
# -> (patch tokens (n, D) before LN_post, their grid).
StitchedForm = Callable[[nn.Module, StitchedTokens, int], tuple[Tensor, tuple[int, int]]]

# Attention rows start..end of one attention over M tokens: (H|1, end − start, M), rows summing to 1.
AttentionRows = Callable[[int, int], Tensor]


def rows_times(rows: AttentionRows, y: Tensor, chunk: int, start: int = 0, end: int | None = None) -> Tensor:
    """Attn[start:end] · y, ``chunk`` rows of Attn at a time: y (heads, M, d) -> (heads, end − start, d).

    Only one chunk of rows exists at a time (H · chunk · M numbers); each is applied by ``attend``,
    as the windowed heads apply their whole attention.
    """
    end = y.shape[-2] if end is None else end
    out = y.new_empty(y.shape[0], end - start, y.shape[-1])
    for s in range(start, end, chunk):
        e = min(s + chunk, end)
        out[:, s - start : e - start] = attend(rows(s, e)[None], y[None])[0]
    return out


def stitched_form(head: Head) -> tuple[StitchedForm, bool]:
    """``head``'s stitched form and whether the windows must go through the VFM too (the head declared
    a VFM need); a clear error, listing the heads that have one, for a head without it."""
    entry = HEADS.get(head.name)
    if head.stitched is None:
        supported = sorted(n for n in HEADS.names() if getattr(HEADS.get(n).builder, "stitched", None) is not None)
        raise ValueError(
            f"inference.mode=stitch does not support head {head.name!r}; supported heads: "
            f"{', '.join(supported)} (use inference.mode=slide for the others)"
        )
    needs = entry.needs_for(getattr(head, "params", None))
    return head.stitched, bool(needs & {Need.VFM_FEATURES, Need.VFM_ATTENTION})
