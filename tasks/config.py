"""The worker's Celery config: the producers' (``api_client.celery_config``) on the
worker's broker, with the worker's Redis transport. Kept apart from ``tasks.app``, which
builds the app when imported."""

from __future__ import annotations

from typing import Any

from api_client.celery_config import celery_config
from api_client.settings import Settings
from workers.runtime.redis_transport import transport_for


def worker_config(settings: Settings) -> dict[str, Any]:
    """The config a worker of ``settings.worker_kind`` runs with."""
    config = celery_config(settings, long_jobs=settings.worker_kind == "finetune")
    transport = transport_for(config["broker_url"])
    if transport is not None:
        config["broker_transport"] = transport
    return config
