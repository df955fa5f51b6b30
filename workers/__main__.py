"""``python -m workers``: the worker-side commands of ``imageq``."""

import sys

from workers.cli import main

sys.exit(main())
