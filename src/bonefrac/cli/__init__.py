"""The ``bonefrac`` command line: thin Typer commands over the library (top of the stack)."""

from bonefrac.cli.main import app, main

__all__ = ["app", "main"]
