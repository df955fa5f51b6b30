"""Task names, queue names and which queues each worker kind serves (DESIGN §2, §7)."""

from __future__ import annotations

TASK_PREFIX = "imageq."
WEBHOOK_TASK = "imageq.webhook"
# Internal: finishes the side effects (result.json, final webhook) of a job that was
# canceled while queued, on the light webhooks worker rather than a GPU worker.
FINALIZE_TASK = "imageq.finalize"
WEBHOOK_QUEUE = "webhooks"

WORKER_QUEUES: dict[str, tuple[str, ...]] = {
    "caption": ("caption",),
    "match": ("match",),
    "diffusion": ("generate", "inpaint", "style"),
    "inpaint": ("inpaint",),
    "finetune": ("finetune",),
    "webhooks": ("webhooks",),
}
WORKER_KINDS = tuple(WORKER_QUEUES)


def task_name(kind: str) -> str:
    return TASK_PREFIX + kind


def queue_name(base: str, prefix: str = "") -> str:
    """A queue's name with the deployment prefix (``IMAGEQ_QUEUE_PREFIX``) in front."""
    return f"{prefix}{base}"


def celery_priority(priority: int) -> int:
    """imageq says 9 is most urgent; Celery's Redis transport serves 0 first."""
    return 9 - max(0, min(9, priority))
