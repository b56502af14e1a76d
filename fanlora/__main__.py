"""``python -m fanlora`` (what ``torchrun -m fanlora`` runs)."""

from fanlora.cli import main

raise SystemExit(main())
