"""What one worker process holds between tasks: its settings and its warm runtime."""

from __future__ import annotations

import json
from typing import Any

from celery import Celery

from imageq.api_client.celery_config import celery_config
from imageq.api_client.kinds import JOB_KINDS
from imageq.api_client.names import WEBHOOK_QUEUE, WEBHOOK_TASK, celery_priority, queue_name
from imageq.api_client.redact import redact_document, redact_ref
from imageq.api_client.settings import Settings
from imageq.workers.runtime.build import Runtime, build_runtime
from imageq.workers.webhooks.post import WebhookEvent


class WorkerState:
    def __init__(self, settings: Settings, app: Celery) -> None:
        self.settings = settings
        self.app = app
        self.runtime: Runtime | None = None
        self._producers: dict[bool, Celery] = {}

    def start(self) -> Runtime:
        if self.runtime is None:
            self.runtime = build_runtime(self.settings, self.send_webhook, self.send_job)
        return self.runtime

    def require(self) -> Runtime:
        return self.runtime or self.start()

    def stop(self) -> None:
        if self.runtime is not None:
            self.runtime.stop()

    def draining(self) -> None:
        """The worker is shutting down (SIGTERM): jobs that can resume elsewhere stop."""
        if self.runtime is not None:
            self.runtime.ctx.draining.set()

    def _producer(self, long_jobs: bool) -> Celery:
        """This worker's own app when it talks to that broker, else one made for it:
        webhooks go to the inference broker also from a finetune worker, and any worker
        may re-send a fine-tune to the long jobs' broker (failover)."""
        own = self.settings.worker_kind == "finetune"
        if long_jobs == own or self.settings.long_broker_url == self.settings.broker_url:
            return self.app
        if long_jobs not in self._producers:
            app = Celery("imageq-producer", set_as_current=False)
            app.conf.update(celery_config(self.settings, long_jobs=long_jobs))
            self._producers[long_jobs] = app
        return self._producers[long_jobs]

    def send_webhook(self, event: WebhookEvent) -> None:
        # Flower and task events show argsrepr: no URL token or password, no job record.
        shown = {"webhook_id": event.webhook_id, "type": event.type, "url": redact_ref(event.url)}
        self._producer(long_jobs=False).send_task(
            WEBHOOK_TASK,
            args=[event.to_dict()],
            queue=queue_name(WEBHOOK_QUEUE, self.settings.queue_prefix),
            argsrepr=json.dumps([{**shown, "attempt": event.attempt}]),
        )

    def send_job(self, document: dict[str, Any]) -> None:
        """Send a stored job document to its kind's queue again, with the same task id
        (as the client did: a backend's Celery client sees one task)."""
        spec = JOB_KINDS[document["kind"]]
        self._producer(long_jobs=spec.long_job).send_task(
            spec.task_name,
            args=[document],
            task_id=document["id"],
            queue=queue_name(spec.queue, self.settings.queue_prefix),
            priority=celery_priority(int(document.get("priority", 5))),
            argsrepr=json.dumps([redact_document(document)]),
        )
