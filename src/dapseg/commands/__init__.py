"""Subcommands of the ``dapseg`` CLI, one module each."""
