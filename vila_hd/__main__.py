"""``python -m vila_hd`` runs the ``vila-hd`` command."""

from .cli import main

raise SystemExit(main())
