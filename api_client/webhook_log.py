"""Webhook deliveries that did not get through, kept so they can be sent again.

A consumer that was down longer than the retry schedule (or answered 410) would lose
those events for good. The webhooks worker keeps each such delivery here, bounded in
count and age (``IMAGEQ_WEBHOOK_KEEP_S``, ``IMAGEQ_WEBHOOK_KEEP_MAX``); ``Client``
lists and replays them. A replay re-sends the same event with the same webhook id (so
consumers still de-duplicate) and a fresh signature timestamp.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel

from imageq.api_client.records import RecordStore, utcnow
from imageq.api_client.redact import redact_ref
from imageq.api_client.scripts import script


class KeptOutcome(StrEnum):
    """Why a delivery was kept."""

    FAILED = "failed"  # retries exhausted
    GONE = "gone"  # the receiver answered 410


class KeptDelivery(BaseModel):
    """One kept delivery, as listed (the URL is redacted: listings may be shared)."""

    webhook_id: str
    job_id: str
    type: str
    url: str
    outcome: KeptOutcome
    attempts: int
    kept_at: str


class WebhookLog:
    def __init__(self, store: RecordStore) -> None:
        self.store = store
        self.settings = store.settings
        self._events = store.keys.webhooks_kept()
        self._index = store.keys.webhooks_kept_index()

    def keep(self, event: dict[str, Any], outcome: KeptOutcome) -> None:
        """Keep a delivery that will not be tried again (called by the webhooks worker)."""
        now = time.time()
        entry = {"event": event, "outcome": str(outcome), "kept_at": utcnow()}
        webhook_id = str(event["webhook_id"])
        pipe = self.store.redis.pipeline(transaction=True)
        pipe.hset(self._events, webhook_id, json.dumps(entry))
        pipe.zadd(self._index, {webhook_id: now})
        pipe.execute()
        self._prune(now)

    def _prune(self, now: float) -> None:
        r = self.store.redis
        stale = [str(i) for i in r.zrangebyscore(self._index, "-inf", now - self._keep_s())]
        count = int(r.zcard(self._index))
        excess = max(0, count - len(stale) - self.settings.webhook_keep_max)
        if excess:
            stale += [str(i) for i in r.zrange(self._index, len(stale), len(stale) + excess - 1)]
        if stale:
            pipe = r.pipeline(transaction=True)
            pipe.hdel(self._events, *stale)
            pipe.zrem(self._index, *stale)
            pipe.execute()

    def _keep_s(self) -> float:
        return float(self.settings.webhook_keep_s)

    def entries(
        self,
        *,
        outcome: KeptOutcome | None = None,
        job_id: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[tuple[str, dict[str, Any]]]:
        """Kept (webhook id, entry) pairs, newest first, filtered."""
        # Entries past their keep time may linger until the next keep() prunes them.
        low = max(since or 0.0, time.time() - self._keep_s())
        ids = [str(i) for i in self.store.redis.zrevrangebyscore(self._index, "+inf", low)]
        if not ids:
            return []
        raws = self.store.redis.hmget(self._events, ids)
        out = []
        for webhook_id, raw in zip(ids, raws, strict=True):
            if raw is None:
                continue
            entry = json.loads(raw)
            if outcome is not None and entry["outcome"] != outcome:
                continue
            if job_id is not None and entry["event"].get("data", {}).get("id") != job_id:
                continue
            out.append((webhook_id, entry))
            if len(out) >= limit:
                break
        return out

    def listing(self, **filters: Any) -> list[KeptDelivery]:
        return [
            KeptDelivery(
                webhook_id=webhook_id,
                job_id=str(entry["event"].get("data", {}).get("id", "")),
                type=str(entry["event"]["type"]),
                url=redact_ref(str(entry["event"]["url"])),
                outcome=KeptOutcome(entry["outcome"]),
                attempts=int(entry["event"].get("attempt", 0)) + 1,
                kept_at=str(entry["kept_at"]),
            )
            for webhook_id, entry in self.entries(**filters)
        ]

    def replay(self, webhook_id: str, send: Callable[[dict[str, Any]], None]) -> bool:
        """Send a kept delivery again (attempt 0) through ``send``, then stop keeping it;
        whether there was one to send.

        Sent first, removed after: should ``send`` fail (the broker away), the entry
        stays kept for the next replay; a crash between the two only sends it twice,
        and the webhooks worker delivers one webhook-id once. Its "done" mark goes
        before the send, so that the worker does not drop it as a duplicate.
        """
        r = self.store.redis
        raw = r.hget(self._events, webhook_id)
        if raw is None:
            return False
        r.delete(self.store.keys.webhook_done(webhook_id))
        event: dict[str, Any] = json.loads(raw)["event"]
        event["attempt"] = 0
        send(event)
        # Only the entry just sent: one kept again meanwhile (this replay failed too)
        # must stay.
        remove = script(r, "remove_kept_if_same")
        remove(keys=[self._events, self._index], args=[webhook_id, raw])
        return True


def parse_since(value: str, now: float | None = None) -> float:
    """A time as epoch seconds: ISO 8601 (``2026-11-30T12:00:00Z``) or an age (``90s``,
    ``30m``, ``2h``, ``7d``)."""
    text = value.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return (time.time() if now is None else now) - float(text[:-1]) * units[text[-1]]
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"since: {value!r} is neither an ISO 8601 time nor an age like 30m, 2h or 7d"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()
