"""Inference: the dense CLIP engine, windows and the registered strategies (whole, slide, splice, stitch)."""
