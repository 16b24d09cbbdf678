"""``python -m popek.api``: what ``popek serve`` runs (see :mod:`popek.api.server`)."""

from popek.api.server import main

if __name__ == "__main__":
    main()
