"""``python -m imageq``: the ``imageq`` command."""

from imageq.api_client.cli import main

raise SystemExit(main())
