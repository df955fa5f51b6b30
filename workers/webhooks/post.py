"""One webhook delivery attempt and the retry schedule (DESIGN §5).

The Celery task and the retry bookkeeping live elsewhere; this module only signs, posts
and classifies the answer, so it can run and be tested without a broker.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import requests

from imageq.api_client.errors import ForbiddenUrl, InputFetchFailed
from imageq.api_client.redact import redact_ref
from imageq.api_client.settings import Settings
from imageq.api_client.webhooks import sign
from imageq.workers.io.netguard import Deadline, check_url, safe_session

log = logging.getLogger(__name__)

USER_AGENT = "imageq-webhooks/1"


class DeliveryOutcome(StrEnum):
    delivered = "delivered"  # 2xx
    gone = "gone"  # 410: the receiver asks us to stop
    retry = "retry"  # anything else, timeouts, connection errors
    refused = "refused"  # we will not send it: URL refused or no secret configured


@dataclass
class WebhookEvent:
    """One event to deliver; crosses Redis as JSON, so it holds only JSON-safe values."""

    webhook_id: str
    url: str
    type: str
    timestamp: str
    data: dict[str, Any] = field(default_factory=dict)
    attempt: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "webhook_id": self.webhook_id,
            "url": self.url,
            "type": self.type,
            "timestamp": self.timestamp,
            "data": self.data,
            "attempt": self.attempt,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> WebhookEvent:
        # Unknown keys are ignored so events written by a newer release still load
        # during a rolling deploy.
        missing = [k for k in ("webhook_id", "url", "type", "timestamp") if k not in raw]
        if missing:
            raise ValueError(f"webhook event lacks {', '.join(missing)}")
        data = raw.get("data") or {}
        if not isinstance(data, dict):
            raise ValueError("webhook event data must be an object")
        return cls(
            webhook_id=str(raw["webhook_id"]),
            url=str(raw["url"]),
            type=str(raw["type"]),
            timestamp=str(raw["timestamp"]),
            data=data,
            attempt=int(raw.get("attempt", 0)),
        )


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as null: JSON has no such numbers, and strict
    parsers on the receiving side reject the whole body (a diverged loss is NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def body_of(event: WebhookEvent) -> bytes:
    """The exact bytes that are signed and posted."""
    document = {"type": event.type, "timestamp": event.timestamp, "data": _finite(event.data)}
    return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()


def deliver(
    event: WebhookEvent, settings: Settings, session: requests.Session | None = None
) -> DeliveryOutcome:
    """Post ``event`` once and say what to do next. Never raises for network trouble."""
    where = redact_ref(event.url)
    if not settings.webhook_secret:
        log.warning("webhook %s to %s refused: no webhook secret", event.webhook_id, where)
        return DeliveryOutcome.refused
    try:
        check_url(event.url, settings)
    except ForbiddenUrl as exc:
        log.warning("webhook %s refused: %s", event.webhook_id, exc.message)
        return DeliveryOutcome.refused
    except InputFetchFailed as exc:  # DNS trouble may pass
        log.info("webhook %s to %s: %s", event.webhook_id, where, exc.message)
        return DeliveryOutcome.retry
    body = body_of(event)
    try:
        # Same webhook-id on every retry so receivers can dedupe; sign() stamps a fresh time.
        secrets = [settings.webhook_secret, *settings.webhook_extra_secrets]
        headers = sign([s.get_secret_value() for s in secrets], event.webhook_id, body)
    except ValueError as exc:
        log.error("webhook %s refused: %s", event.webhook_id, exc)
        return DeliveryOutcome.refused
    headers["user-agent"] = USER_AGENT
    http = session if session is not None else safe_session(settings)
    try:
        # The deadline bounds the whole exchange; the response body is never read, so a
        # receiver that answers slowly cannot hold the worker past it.
        with Deadline(settings.webhook_timeout_s) as deadline:
            response = http.post(
                event.url,
                data=body,
                headers=headers,
                timeout=deadline.remaining(),
                allow_redirects=False,
                stream=True,
            )
            status = response.status_code
            response.close()
    except ForbiddenUrl as exc:  # the address changed between check_url and connect
        log.warning("webhook %s refused: %s", event.webhook_id, exc.message)
        return DeliveryOutcome.refused
    except (requests.RequestException, OSError, InputFetchFailed) as exc:
        log.info("webhook %s to %s failed: %s", event.webhook_id, where, type(exc).__name__)
        return DeliveryOutcome.retry
    finally:
        if session is None:
            http.close()
    if 200 <= status < 300:
        outcome = DeliveryOutcome.delivered
    elif status == 410:
        outcome = DeliveryOutcome.gone
    else:
        outcome = DeliveryOutcome.retry
    log.info("webhook %s to %s: HTTP %s, %s", event.webhook_id, where, status, outcome.value)
    return outcome


def next_delay_s(
    attempt: int, settings: Settings, rng: random.Random | None = None
) -> float | None:
    """Seconds to wait before try number ``attempt`` (0 is the first), or None when done.

    Jitter spreads retries of many events that failed together (a receiver outage).
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    schedule = settings.webhook_schedule_s
    if attempt >= len(schedule):
        return None
    spread = max(0.0, settings.webhook_jitter)
    offset = (rng or random).uniform(-spread, spread) if spread else 0.0
    return max(0.0, schedule[attempt] * (1.0 + offset))
