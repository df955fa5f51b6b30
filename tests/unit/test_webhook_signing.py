"""Standard Webhooks signing and verification, checked against the reference package."""

from __future__ import annotations

import json
import time

import pytest
from standardwebhooks.webhooks import Webhook

from imageq.api_client.webhooks import WebhookVerificationError, new_secret, sign, verify

BODY = json.dumps({"type": "job.succeeded", "data": {"id": "j1"}}).encode()


def test_signature_verifies_with_reference_implementation() -> None:
    secret = new_secret()
    headers = sign(secret, "msg_1", BODY)
    assert Webhook(secret).verify(BODY, headers)["type"] == "job.succeeded"
    assert verify(headers, BODY, secret)["data"]["id"] == "j1"


def test_reference_signature_verifies_here() -> None:
    secret = new_secret()
    wh = Webhook(secret)
    ts = int(time.time())
    from datetime import UTC, datetime

    sig = wh.sign("msg_2", datetime.fromtimestamp(ts, UTC), BODY.decode())
    headers = {"webhook-id": "msg_2", "webhook-timestamp": str(ts), "webhook-signature": sig}
    assert verify(headers, BODY, secret)["type"] == "job.succeeded"


def test_tampered_body_wrong_secret_and_stale_timestamp_are_refused() -> None:
    secret = new_secret()
    headers = sign(secret, "msg_3", BODY)
    with pytest.raises(WebhookVerificationError):
        verify(headers, BODY + b" ", secret)
    with pytest.raises(WebhookVerificationError):
        verify(headers, BODY, new_secret())
    old = sign(secret, "msg_3", BODY, timestamp=int(time.time()) - 301)
    with pytest.raises(WebhookVerificationError, match="timestamp"):
        verify(old, BODY, secret)
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify({"webhook-id": "x"}, BODY, secret)


def test_rotation_signs_with_every_secret() -> None:
    old, new = new_secret(), new_secret()
    headers = sign([new, old], "msg_4", BODY)
    assert len(headers["webhook-signature"].split()) == 2
    assert verify(headers, BODY, old) and verify(headers, BODY, new)
    assert Webhook(old).verify(BODY, headers)
