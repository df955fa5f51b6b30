"""What one worker process holds between tasks: its settings and its warm runtime."""

from __future__ import annotations

import json

from celery import Celery

from api_client.celery_config import celery_config
from api_client.names import WEBHOOK_QUEUE, WEBHOOK_TASK, queue_name
from api_client.redact import redact_ref
from api_client.settings import Settings
from workers.runtime.build import Runtime, build_runtime
from workers.webhooks.post import WebhookEvent


class WorkerState:
    def __init__(self, settings: Settings, app: Celery) -> None:
        self.settings = settings
        self.app = app
        self.runtime: Runtime | None = None
        self._webhook_app: Celery | None = None

    def start(self) -> Runtime:
        if self.runtime is None:
            self.runtime = build_runtime(self.settings, self.send_webhook)
        return self.runtime

    def require(self) -> Runtime:
        return self.runtime or self.start()

    def stop(self) -> None:
        if self.runtime is not None:
            self.runtime.stop()

    def _webhooks_producer(self) -> Celery:
        """Webhooks go to the inference broker, also from a finetune worker on its own."""
        if self.settings.long_broker_url == self.settings.broker_url or (
            self.settings.worker_kind != "finetune"
        ):
            return self.app
        if self._webhook_app is None:
            self._webhook_app = Celery("imageq-webhooks", set_as_current=False)
            self._webhook_app.conf.update(celery_config(self.settings))
        return self._webhook_app

    def send_webhook(self, event: WebhookEvent) -> None:
        # Flower and task events show argsrepr: no URL token or password, no job record.
        shown = {"webhook_id": event.webhook_id, "type": event.type, "url": redact_ref(event.url)}
        self._webhooks_producer().send_task(
            WEBHOOK_TASK,
            args=[event.to_dict()],
            queue=queue_name(WEBHOOK_QUEUE, self.settings.queue_prefix),
            argsrepr=json.dumps([{**shown, "attempt": event.attempt}]),
        )
