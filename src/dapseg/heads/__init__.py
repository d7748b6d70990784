"""Last-block heads, registered by name (see ``base.py``)."""

from dapseg.heads import dap, proxy  # noqa: F401  (register the proxy-attention heads)
