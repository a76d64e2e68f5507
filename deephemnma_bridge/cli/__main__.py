"""``python -m deephemnma_bridge.cli COMMAND ...`` (used by torchrun for sharded runs)."""

import sys

from . import main

sys.exit(main())
