"""Subcommands of the `actsparse` CLI, one module each."""
