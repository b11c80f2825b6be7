"""``python -m kvstore``: the ``kvstore`` command (kvstore/cli.py)."""

import sys

from kvstore.cli import main

sys.exit(main())
