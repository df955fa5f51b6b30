"""Webhook delivery on the ``webhooks`` queue: once per webhook-id, retried on a schedule.

Waits between retries can be hours, longer than the broker's visibility timeout, so they
are not Celery countdowns (Redis would run those twice): a due-time sorted set in Redis
holds them, and every webhooks worker moves due events back into the queue.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from api_client.records import RecordStore
from api_client.webhook_log import KeptOutcome, WebhookLog
from workers.webhooks.post import DeliveryOutcome, WebhookEvent, deliver, next_delay_s

log = logging.getLogger(__name__)


class WebhookDispatcher:
    def __init__(self, store: RecordStore, enqueue: Callable[[WebhookEvent], None]) -> None:
        self.store = store
        self.settings = store.settings
        self.enqueue = enqueue
        self.log = WebhookLog(store)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _done_key(self, webhook_id: str) -> str:
        return self.store.key("wh", webhook_id, "done")

    def handle(self, event: WebhookEvent) -> str:
        """Deliver one attempt; returns the outcome (or ``duplicate``)."""
        r = self.store.redis
        if r.exists(self._done_key(event.webhook_id)):
            return "duplicate"
        lock = self.store.key("wh", event.webhook_id, "lock")
        hold_ms = int((self.settings.webhook_timeout_s + 5) * 1000)
        if not r.set(lock, "1", nx=True, px=hold_ms):
            return "duplicate"
        try:
            outcome = deliver(event, self.settings)
            if outcome == DeliveryOutcome.retry:
                delay = next_delay_s(event.attempt + 1, self.settings)
                if delay is not None:
                    self.schedule(event, delay)
                    return str(outcome.value)
                log.warning("webhook %s: retries exhausted; kept for replay", event.webhook_id)
                self.log.keep(event.to_dict(), KeptOutcome.FAILED)
            elif outcome == DeliveryOutcome.gone:
                log.warning(
                    "webhook %s: the receiver answered 410; kept for replay", event.webhook_id
                )
                self.log.keep(event.to_dict(), KeptOutcome.GONE)
            r.set(
                self._done_key(event.webhook_id),
                outcome.value,
                ex=self.settings.result_ttl_s,
            )
            return str(outcome.value)
        finally:
            r.delete(lock)

    def schedule(self, event: WebhookEvent, delay_s: float) -> None:
        event.attempt += 1
        due = time.time() + delay_s
        self.store.redis.zadd(self.store.key("wh", "due"), {json.dumps(event.to_dict()): due})

    def pump(self) -> int:
        """Move due retries into the queue; ZREM makes each one move exactly once."""
        key = self.store.key("wh", "due")
        moved = 0
        due = self.store.redis.zrangebyscore(key, "-inf", time.time(), start=0, num=100)
        for raw in (str(item) for item in due):
            if self.store.redis.zrem(key, raw):
                self.enqueue(WebhookEvent.from_dict(json.loads(raw)))
                moved += 1
        return moved

    def start(self, every_s: float = 0.2) -> None:
        def loop() -> None:
            while not self._stop.wait(every_s):
                try:
                    self.pump()
                except Exception as exc:  # Redis away for a moment: try again next tick
                    log.warning("webhook scheduler: %s", exc)

        self._thread = threading.Thread(target=loop, name="imageq-webhook-pump", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
