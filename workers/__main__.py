"""``python -m workers``: the worker-side commands of ``imageq``."""

import sys

from imageq.workers.ops.cli import main

sys.exit(main())
