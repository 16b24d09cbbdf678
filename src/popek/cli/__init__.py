"""The ``popek`` command line (Typer)."""
