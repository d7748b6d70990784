"""Inference strategies (whole, slide, splice, stitch) over a dense CLIP engine."""

from dapseg.inference import (
    splice,  # noqa: F401  (registers splice)
    stitch,  # noqa: F401  (registers stitch)
    strategies,  # noqa: F401  (registers whole and slide)
)
