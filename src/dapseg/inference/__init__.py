"""Inference strategies (whole, slide, splice) over a dense CLIP engine."""

from dapseg.inference import (
    splice,  # noqa: F401  (registers splice)
    strategies,  # noqa: F401  (registers whole and slide)
)
