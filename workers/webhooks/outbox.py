"""Webhook delivery on the ``webhooks`` queue: once per webhook-id, retried on a schedule.

Waits between retries can be hours, longer than the broker's visibility timeout, so they
are not Celery countdowns (Redis would run those twice): a due-time sorted set in Redis
holds them, and every webhooks worker moves due events back into the queue.

An event leaves the due set only once it is in the queue: a pump first claims it by
moving its due time a short "in flight" window ahead (one script, so exactly one pump
wins it), sends it, then removes it. A send that fails puts the due time back; a pump
that dies mid-way leaves the event due again once the window has passed (sent twice at
worst, and the worker delivers one webhook-id once; never lost).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from imageq.api_client.records import RecordStore
from imageq.api_client.scripts import script
from imageq.api_client.webhook_log import KeptOutcome, WebhookLog
from imageq.workers.runtime.ticker import Ticker
from imageq.workers.webhooks.post import DeliveryOutcome, WebhookEvent, deliver, next_delay_s

log = logging.getLogger(__name__)


class WebhookDispatcher:
    def __init__(
        self,
        store: RecordStore,
        enqueue: Callable[[WebhookEvent], None],
        *,
        in_flight_s: float = 30.0,
    ) -> None:
        """``in_flight_s``: how long a claimed retry stays out of other pumps' way; far
        longer than a send to the broker takes, short next to the retry schedule."""
        self.store = store
        self.settings = store.settings
        self.enqueue = enqueue
        self.in_flight_s = in_flight_s
        self._claim = script(store.redis, "outbox_claim")
        self._unclaim = script(store.redis, "outbox_unclaim")
        self.log = WebhookLog(store)
        self._ticker: Ticker | None = None

    def _done_key(self, webhook_id: str) -> str:
        return self.store.keys.webhook_done(webhook_id)

    def handle(self, event: WebhookEvent) -> str:
        """Deliver one attempt; returns the outcome (or ``duplicate``)."""
        r = self.store.redis
        if r.exists(self._done_key(event.webhook_id)):
            return "duplicate"
        lock = self.store.keys.webhook_lock(event.webhook_id)
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
        self.store.redis.zadd(self.store.keys.webhook_due(), {json.dumps(event.to_dict()): due})

    def pump(self) -> int:
        """Move due retries into the queue, each once (see the module's docstring).

        A failed send puts that event's due time back and stops the pass (the broker is
        likely away): the loop tries again on its next tick.
        """
        key = self.store.keys.webhook_due()
        r = self.store.redis
        moved = 0
        now = time.time()
        due = r.zrangebyscore(key, "-inf", now, start=0, num=100)
        for raw in (str(item) for item in due):
            # Sent as a string that reads back as the same double, so that the unclaim
            # script can tell this pump's claim from a later one.
            until = repr(now + self.in_flight_s)
            was = self._claim(keys=[key], args=[raw, now, until])
            if was is None:  # another pump has it
                continue
            try:
                self.enqueue(WebhookEvent.from_dict(json.loads(raw)))
            except Exception:
                self._unclaim(keys=[key], args=[raw, until, was])
                raise
            r.zrem(key, raw)
            moved += 1
        return moved

    def start(self, every_s: float = 0.2) -> None:
        self._ticker = Ticker("imageq-webhook-pump", every_s, self.pump).start()

    def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
