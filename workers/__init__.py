"""The imageq runtime: everything a worker does, without Celery."""
