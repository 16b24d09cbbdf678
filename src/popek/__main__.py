"""``python -m popek`` runs the CLI."""

from popek.cli.main import main

main()
