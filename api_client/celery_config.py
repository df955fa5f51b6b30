"""Celery configuration shared by producers (the Client) and workers (tasks.app).

Both sides must agree on serialisation, routing and the Redis transport options, so
they are built in one place from the one ``Settings``.
"""

from __future__ import annotations

from typing import Any

from imageq.api_client.kinds import KINDS
from imageq.api_client.names import (
    FINALIZE_TASK,
    WEBHOOK_QUEUE,
    WEBHOOK_TASK,
    job_queue,
    queue_name,
    task_name,
)
from imageq.api_client.settings import Settings


def transport_options(visibility_timeout_s: int) -> dict[str, Any]:
    # kombu restores unacked messages on a timer; with a short visibility timeout
    # (tests, fault drills) the default 10 s x 10 throttle would hide redelivery.
    restore_every_s = max(1, min(10, visibility_timeout_s // 4))
    return {
        "visibility_timeout": visibility_timeout_s,
        "unacked_restore_interval": restore_every_s,
        "unacked_restore_throttle": 1,
        # The lock one restoring worker holds for a pass of a few milliseconds. kombu keeps
        # it 300 s, so a worker killed while holding it (SIGKILL, OOM) stopped every
        # worker's redelivery on that broker for five minutes. Two passes at once are
        # safe: each message moves back inside a WATCH transaction on the unacked hash.
        "unacked_mutex_expire": 2 * restore_every_s,
        "priority_steps": list(range(10)),
        "queue_order_strategy": "priority",
    }


def celery_config(settings: Settings, *, long_jobs: bool = False) -> dict[str, Any]:
    """Config for the inference broker, or (``long_jobs``) the finetune broker."""
    prefix = settings.queue_prefix
    routes: dict[str, dict[str, str]] = {
        task_name(kind): {"queue": job_queue(kind, prefix)} for kind in KINDS
    }
    routes[WEBHOOK_TASK] = {"queue": queue_name(WEBHOOK_QUEUE, prefix)}
    routes[FINALIZE_TASK] = {"queue": queue_name(WEBHOOK_QUEUE, prefix)}
    visibility = (
        settings.finetune_visibility_timeout_s if long_jobs else settings.visibility_timeout_s
    )
    return {
        "broker_url": settings.long_broker_url if long_jobs else settings.broker_url,
        "broker_transport_options": transport_options(visibility),
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        # A pickled message is refused before it can run.
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "task_track_started": False,
        "task_routes": routes,
        "task_default_queue": queue_name("default", prefix),
        "task_default_priority": 4,
        "worker_hijack_root_logger": True,
        "worker_redirect_stdouts": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }
