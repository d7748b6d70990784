"""Last-block heads, registered by name (see ``base.py``)."""

from dapseg.heads import maskclip, naclip, sclip, vanilla  # noqa: F401  (registration)
