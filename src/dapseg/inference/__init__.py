"""Inference strategies (whole, slide, splice) over a dense CLIP engine."""

from dapseg.inference import strategies  # noqa: F401  (registers whole and slide)
