"""The Celery app and thin task adapters over the Celery-free runtime in ``workers``."""
