"""``python -m deephemnma_bridge`` runs the ``deephemnma`` command line."""

from deephemnma_bridge.cli import main

raise SystemExit(main())
