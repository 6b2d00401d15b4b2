"""``python -m pcamtool`` is ``pcamtool``; also what ``torchrun -m pcamtool`` runs."""
from .cli import main

main()
