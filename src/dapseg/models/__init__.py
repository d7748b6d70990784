"""Model wrappers: CLIP (clip.py) and vision foundation models (vfm.py)."""
