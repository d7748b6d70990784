"""Last-block heads, registered by name (see ``base.py``)."""

from dapseg.heads import dap, maskclip, naclip, pearl, proxy, sclip, vanilla  # noqa: F401  (registration)
