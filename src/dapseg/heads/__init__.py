"""Last-block heads, registered by name (see ``base.py``)."""
