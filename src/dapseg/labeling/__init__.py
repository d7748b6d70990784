"""Labeling an image collection (``dapseg segment``): resumable, sharded over torchrun ranks.

``inputs`` turns command-line paths, folders, globs and input lists into images with deterministic
output names; ``outputs`` names and writes each kind of output; ``job`` keeps the settings, the
per-rank journals (the completion markers) and the manifest of an out dir; ``run`` is the loop.
"""
