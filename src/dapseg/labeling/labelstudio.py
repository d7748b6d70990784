"""Label Studio brush masks: a label map -> ``brushlabels`` results in Label Studio's own RLE.

Label Studio stores a brush mask as the RGBA bytes of the mask image (row-major, 4 bytes a pixel,
255 where painted, 0 elsewhere; it reads the alpha channel) run-length packed with thi.ng's
``rle-pack`` bit layout, as its converter (``label_studio_sdk.converter.brush``) writes and decodes it:

  header: 32 bits the number of values, 5 bits word size - 1, 4 × 4 bits the run-length field sizes - 1
  a run:  1 bit (1: one value repeated, 0: literal values), 2 bits which run-length field size,
          that many bits run length - 1, then the value (repeated run) or the values (literal run)
  then zero bits up to a whole byte.

We write repeated runs only (every run is at least 4 values long: a pixel is 4 bytes), 8-bit words and
the field sizes Label Studio's encoder uses (3, 4, 8, 16 bits); a run longer than 2**16 values is cut
into runs of 2**16. Unlabeled pixels (``postprocess.UNLABELED``) belong to no result. The tests decode
every mask with Label Studio's own decoder.
"""

from __future__ import annotations

from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np

from dapseg.postprocess import UNLABELED

WORD_BITS = 8
RUN_FIELD_BITS = (3, 4, 8, 16)  # run length - 1 fits in 3, 4, 8 or 16 bits
MAX_RUN = 1 << RUN_FIELD_BITS[-1]
RECORD_BITS = 1 + 2 + RUN_FIELD_BITS[-1] + WORD_BITS  # the longest run record


def _bits(values: np.ndarray, width: int) -> np.ndarray:
    """(n,) non-negative ints -> (n, width) their bits, most significant first."""
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((values.astype(np.int64)[:, None] >> shifts) & 1).astype(np.uint8)


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """(H, W) bool mask -> Label Studio's brush RLE (a list of byte values)."""
    flat = np.asarray(mask, dtype=bool).ravel()
    n_values = flat.size * 4  # RGBA
    if flat.size == 0:
        raise ValueError("an empty mask has no brush RLE")
    # Runs of equal pixels: starts, lengths (in values, 4 a pixel) and values (0 or 255).
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [flat.size]])) * 4
    values = np.where(flat[starts], 255, 0)
    # A run over MAX_RUN values is cut into MAX_RUN-long runs and a remainder.
    pieces = -(-lengths // MAX_RUN)
    run_values = np.repeat(values, pieces)
    run_lengths = np.full(int(pieces.sum()), MAX_RUN, dtype=np.int64)
    last = np.cumsum(pieces) - 1
    run_lengths[last] = lengths - (pieces - 1) * MAX_RUN
    # Each run: flag 1, field index, length - 1 in that field's width, the value; laid out in
    # fixed-width rows of RECORD_BITS and compacted by a per-row mask of the bits in use.
    field = np.searchsorted(np.array([1 << b for b in RUN_FIELD_BITS]), run_lengths)  # smallest that fits
    rows = np.zeros((run_lengths.size, RECORD_BITS), dtype=np.uint8)
    rows[:, 0] = 1
    rows[:, 1:3] = _bits(field, 2)
    length_bits = _bits(run_lengths - 1, RUN_FIELD_BITS[-1])  # (n, 16), right-aligned
    value_bits = _bits(run_values, WORD_BITS)
    used = np.zeros_like(rows, dtype=bool)
    used[:, :3] = True
    for k, width in enumerate(RUN_FIELD_BITS):
        sel = field == k
        rows[sel, 3 : 3 + width] = length_bits[sel, RUN_FIELD_BITS[-1] - width :]
        rows[sel, 3 + width : 3 + width + WORD_BITS] = value_bits[sel]
        used[sel, : 3 + width + WORD_BITS] = True
    header = np.concatenate([
        _bits(np.array([n_values]), 32)[0],
        _bits(np.array([WORD_BITS - 1]), 5)[0],
        *(_bits(np.array([b - 1]), 4)[0] for b in RUN_FIELD_BITS),
    ])
    stream = np.concatenate([header, rows[used]])
    return np.packbits(stream).tolist()  # packbits pads the last byte with zeros


def brush_results(labels: np.ndarray, classes: list[str], *, from_name: str = "tag",
                  to_name: str = "image") -> list[dict[str, Any]]:
    """labels (H, W) int class indices with ``UNLABELED`` -> one ``brushlabels`` result per class
    present, in class order, as Label Studio's task JSON and ML backends carry them."""
    h, w = labels.shape
    present = [int(c) for c in np.unique(labels) if c != UNLABELED]
    return [{
        "id": f"dapseg_{c}",  # unique within a prediction, and the same on every run
        "from_name": from_name,
        "to_name": to_name,
        "type": "brushlabels",
        "original_width": int(w),
        "original_height": int(h),
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_rle(labels == c), "brushlabels": [classes[c]]},
    } for c in present]


def labeling_config(classes: list[str], colours: np.ndarray, *, from_name: str = "tag",
                    to_name: str = "image") -> str:
    """A Label Studio labeling config with one brush label per class, in the given (C, 3) colours."""
    labels = "\n".join(f"    <Label value={quoteattr(name)} background={quoteattr(_hex(rgb))}/>"
                       for name, rgb in zip(classes, colours.tolist(), strict=True))
    return (f"<View>\n  <Image name={quoteattr(to_name)} value=\"$image\" zoom=\"true\"/>\n"
            f"  <BrushLabels name={quoteattr(from_name)} toName={quoteattr(to_name)}>\n{labels}\n"
            "  </BrushLabels>\n</View>\n")


def _hex(rgb: list[int]) -> str:
    r, g, b = rgb
    return f"#{r:02x}{g:02x}{b:02x}"
