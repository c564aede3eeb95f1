"""``python -m camlens`` runs the command line."""

from .cli import main

main()
