"""Standard Webhooks signatures (https://www.standardwebhooks.com), both sides.

``sign`` is used by the delivery worker; ``verify`` is what a webhook consumer calls.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

SECRET_PREFIX = "whsec_"
TOLERANCE_S = 300


class WebhookVerificationError(Exception):
    """The request was not signed by a holder of the secret, or is too old or new."""


def _key(secret: str) -> bytes:
    if secret.startswith(SECRET_PREFIX):
        secret = secret[len(SECRET_PREFIX) :]
    try:
        return base64.b64decode(secret, validate=True)
    except ValueError as exc:
        raise ValueError("webhook secret must be whsec_ followed by base64") from exc


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign(
    secrets: str | Sequence[str], msg_id: str, body: bytes, timestamp: int | None = None
) -> dict[str, str]:
    """Headers for one delivery; several secrets give several signatures (rotation)."""
    ts = int(time.time()) if timestamp is None else timestamp
    keys = [secrets] if isinstance(secrets, str) else list(secrets)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": " ".join(signature(s, msg_id, ts, body) for s in keys),
        "content-type": "application/json",
    }


def verify(
    headers: Mapping[str, str],
    body: bytes | str,
    secret: str | Sequence[str],
    *,
    tolerance_s: int = TOLERANCE_S,
    now: float | None = None,
) -> dict[str, Any]:
    """Check a delivery and return its parsed body; raise WebhookVerificationError if bad.

    ``secret`` may list several secrets while one is being rotated out.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id = lowered["webhook-id"]
        ts_raw = lowered["webhook-timestamp"]
        sig_header = lowered["webhook-signature"]
    except KeyError as exc:
        raise WebhookVerificationError(f"missing header {exc.args[0]}") from None
    try:
        ts = int(ts_raw)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is too far from now")
    raw = body.encode() if isinstance(body, str) else body
    offered = [part.split(",", 1)[1] for part in sig_header.split() if part.startswith("v1,")]
    secrets = [secret] if isinstance(secret, str) else list(secret)
    for s in secrets:
        expected = signature(s, msg_id, ts, raw).split(",", 1)[1]
        if any(hmac.compare_digest(expected, sig) for sig in offered):
            return dict(json.loads(raw))
    raise WebhookVerificationError("no matching signature")


def new_secret() -> str:
    import secrets as _secrets

    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(24)).decode()


def event_id(job_id: str, event_type: str, created_at: str, key: str = "") -> str:
    """Deterministic, so a re-sent event carries the same id and receivers dedupe.

    ``created_at`` is the job's record's creation time: a job id repeats when an
    idempotency key is used again after its record expired, and that new job's events
    must not be dropped as duplicates of the old one's. A final event has one id per job
    (``msg_{job}_{created ms}_succeeded``); ``key`` tells apart the events a job sends
    several of: ``job.started`` per attempt, ``job.progress`` per attempt, stage and step
    (``progress_key``).
    """
    suffix = event_type.replace("job.", "")
    created_ms = round(datetime.fromisoformat(created_at.replace("Z", "+00:00")).timestamp() * 1000)
    return f"msg_{job_id}_{created_ms}_{suffix}" + (f"_{key}" if key else "")


def progress_key(attempt: int, progress: Mapping[str, Any]) -> str:
    """``a{attempt}_{stage}_{step}``: stages (dataset, training, publishing...) may each
    count from 0, and a run that resumes from a checkpoint repeats steps."""
    stage = re.sub(r"[^A-Za-z0-9]+", "-", str(progress.get("stage") or "run")).strip("-")
    return f"a{attempt}_{stage or 'run'}_{int(progress.get('step') or 0)}"


def preview_key(attempt: int, progress: Mapping[str, Any]) -> str:
    """``a{attempt}_{step}``: one ``job.preview`` a step at most, per attempt (a job run
    again from the start previews the same steps anew)."""
    preview = progress.get("preview") or {}
    return f"a{attempt}_{int(preview.get('step') or 0)}"
