"""Task and queue names (DESIGN §2, §7), derived from the kinds in ``kinds.py``."""

from __future__ import annotations

from imageq.api_client.kinds import JOB_KINDS, WEBHOOK_QUEUE, WORKER_KINDS, worker_queues

TASK_PREFIX = "imageq."
WEBHOOK_TASK = "imageq.webhook"
# Internal: finishes the side effects (result.json, final webhook) of a job that was
# canceled while queued, on the light webhooks worker rather than a GPU worker.
FINALIZE_TASK = "imageq.finalize"

WORKER_QUEUES: dict[str, tuple[str, ...]] = {kind: worker_queues(kind) for kind in WORKER_KINDS}

__all__ = [
    "FINALIZE_TASK",
    "TASK_PREFIX",
    "WEBHOOK_QUEUE",
    "WEBHOOK_TASK",
    "WORKER_KINDS",
    "WORKER_QUEUES",
    "celery_priority",
    "job_queue",
    "queue_name",
    "task_name",
]


def task_name(kind: str) -> str:
    return JOB_KINDS[kind].task_name if kind in JOB_KINDS else TASK_PREFIX + kind


def job_queue(kind: str, prefix: str = "") -> str:
    """The queue a job of ``kind`` is sent to, deployment prefix included."""
    return queue_name(JOB_KINDS[kind].queue, prefix)


def queue_name(base: str, prefix: str = "") -> str:
    """A queue's name with the deployment prefix (``IMAGEQ_QUEUE_PREFIX``) in front."""
    return f"{prefix}{base}"


def celery_priority(priority: int) -> int:
    """imageq says 9 is most urgent; Celery's Redis transport serves 0 first."""
    return 9 - max(0, min(9, priority))
