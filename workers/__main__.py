"""``python -m workers``: the worker-side commands of ``imageq``."""

import sys

from workers.ops.cli import main

sys.exit(main())
