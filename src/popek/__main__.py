"""``python -m popek`` runs the CLI."""

from popek.cli.entry import main

main()
