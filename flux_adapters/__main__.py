"""``python -m flux_adapters``: the ``flux-adapters`` command."""

import sys

from flux_adapters.cli import main

sys.exit(main())
