"""Plug-ins that rework a head's attention without the head knowing (see ``fsa.py``)."""
