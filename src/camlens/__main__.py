"""``python -m camlens`` runs the command line."""

from ._entry import main

main()
