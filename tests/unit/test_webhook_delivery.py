"""One webhook attempt against a loopback receiver, and the retry schedule.

Signatures are checked with the independent ``standardwebhooks`` package, not our verify().
"""

from __future__ import annotations

import ipaddress
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from imageq.api_client.settings import Settings
from imageq.api_client.webhooks import new_secret
from imageq.workers.webhooks.post import (
    DeliveryOutcome,
    WebhookEvent,
    body_of,
    deliver,
    next_delay_s,
)

SECRET = new_secret()
SETTINGS = Settings(webhook_secret=SECRET, allow_private_urls=True, webhook_timeout_s=2.0)


class Receiver:
    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                owner.requests.append((self.path, dict(self.headers.items()), body))
                status = {"/ok": 204, "/created": 201, "/fail": 500, "/gone": 410}.get(self.path)
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("location", "/ok")
                elif self.path == "/slow":
                    owner.release.wait(10)  # longer than any timeout the tests set
                    self.send_response(200)
                else:
                    self.send_response(status or 404)
                self.send_header("content-length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def paths(self) -> list[str]:
        return [path for path, _, _ in self.requests]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    thread = threading.Thread(target=rec.httpd.serve_forever, daemon=True)
    thread.start()
    yield rec
    rec.release.set()
    rec.httpd.shutdown()
    rec.httpd.server_close()


@pytest.fixture(autouse=True)
def fresh(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    receiver.requests.clear()
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> None:
        if not ipaddress.ip_address(address[0]).is_loopback:
            raise AssertionError(f"test tried to connect to {address}")
        real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def event(url: str, **changes: Any) -> WebhookEvent:
    base = WebhookEvent(
        webhook_id="msg_job1_succeeded",
        url=url,
        type="job.succeeded",
        timestamp="2025-01-01T00:00:00Z",
        data={"id": "job1", "status": "succeeded", "output": {"captions": [{"text": "ü"}]}},
    )
    for name, value in changes.items():
        setattr(base, name, value)
    return base


@pytest.mark.parametrize(
    ("path", "outcome"),
    [
        ("/ok", DeliveryOutcome.delivered),
        ("/created", DeliveryOutcome.delivered),
        ("/fail", DeliveryOutcome.retry),
        ("/missing", DeliveryOutcome.retry),
        ("/gone", DeliveryOutcome.gone),
    ],
)
def test_outcome_follows_the_status(
    receiver: Receiver, path: str, outcome: DeliveryOutcome
) -> None:
    assert deliver(event(receiver.url(path)), SETTINGS) == outcome
    assert receiver.paths() == [path]


def test_redirects_are_not_followed(receiver: Receiver) -> None:
    assert deliver(event(receiver.url("/redirect")), SETTINGS) == DeliveryOutcome.retry
    assert receiver.paths() == ["/redirect"]


def test_a_receiver_that_does_not_answer_in_time_is_retried(receiver: Receiver) -> None:
    started = time.monotonic()
    outcome = deliver(event(receiver.url("/slow")), SETTINGS.with_(webhook_timeout_s=0.5))
    assert outcome == DeliveryOutcome.retry
    assert time.monotonic() - started < 1.5


def test_connection_refused_is_retried() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert deliver(event(f"http://127.0.0.1:{port}/ok"), SETTINGS) == DeliveryOutcome.retry


def test_signature_verifies_with_standardwebhooks(receiver: Receiver) -> None:
    before = int(time.time())
    deliver(event(receiver.url("/ok")), SETTINGS)
    ((_, headers, body),) = receiver.requests
    lowered = {k.lower(): v for k, v in headers.items()}
    assert Webhook(SECRET).verify(body, lowered) == json.loads(body)
    assert lowered["webhook-id"] == "msg_job1_succeeded"
    assert before <= int(lowered["webhook-timestamp"]) <= int(time.time())
    assert lowered["content-type"] == "application/json"
    assert json.loads(body) == {
        "type": "job.succeeded",
        "timestamp": "2025-01-01T00:00:00Z",
        "data": event("").data,
    }
    assert body == body_of(event(""))
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, lowered)


def test_retries_keep_the_id_and_every_rotated_secret_verifies(receiver: Receiver) -> None:
    old = new_secret()
    settings = SETTINGS.with_(webhook_extra_secrets=(old,))
    deliver(event(receiver.url("/fail")), settings)
    deliver(event(receiver.url("/ok"), attempt=1), settings)
    ids = [headers["webhook-id"] for _, headers, _ in receiver.requests]
    assert ids == ["msg_job1_succeeded", "msg_job1_succeeded"]
    _, headers, body = receiver.requests[-1]
    lowered = {k.lower(): v for k, v in headers.items()}
    for secret in (SECRET, old):
        Webhook(secret).verify(body, lowered)


@pytest.mark.parametrize(
    "settings",
    [
        SETTINGS.with_(webhook_secret=""),
        SETTINGS.with_(allow_private_urls=False),
        SETTINGS.with_(webhook_secret="whsec_not base64!"),
    ],
    ids=["no-secret", "private-url", "malformed-secret"],
)
def test_refused_without_sending(receiver: Receiver, settings: Settings) -> None:
    assert deliver(event(receiver.url("/ok")), settings) == DeliveryOutcome.refused
    assert receiver.requests == []


def test_non_http_urls_are_refused() -> None:
    for url in ("gopher://127.0.0.1:70/", "file:///etc/passwd"):
        assert deliver(event(url), SETTINGS) == DeliveryOutcome.refused


def test_non_finite_numbers_become_null() -> None:
    body = body_of(event("", data={"metrics": {"final_loss": float("nan"), "x": [float("inf")]}}))
    assert json.loads(body)["data"] == {"metrics": {"final_loss": None, "x": [None]}}


def test_event_round_trips_through_json() -> None:
    original = event("https://hooks.example/x", attempt=3)
    restored = WebhookEvent.from_dict(json.loads(json.dumps(original.to_dict())))
    assert restored == original
    assert WebhookEvent.from_dict({**original.to_dict(), "added_later": 1}) == original
    with pytest.raises(ValueError, match="url"):
        WebhookEvent.from_dict({"webhook_id": "a", "type": "t", "timestamp": "s"})


# --- next_delay_s ----------------------------------------------------------------------


def test_schedule_without_jitter_is_exact() -> None:
    settings = Settings(webhook_schedule_s=(0.0, 5.0, 300.0), webhook_jitter=0.0)
    assert [next_delay_s(n, settings) for n in range(4)] == [0.0, 5.0, 300.0, None]


def test_jitter_stays_within_bounds_and_varies() -> None:
    settings = Settings(webhook_schedule_s=(0.0, 5.0, 300.0), webhook_jitter=0.1)
    rng = random.Random(7)
    delays = [next_delay_s(1, settings, rng) for _ in range(500)]
    values = [d for d in delays if d is not None]
    assert len(values) == 500
    assert all(4.5 <= d <= 5.5 for d in values)
    assert min(values) < 4.6 and max(values) > 5.4  # jitter really spreads them
    assert next_delay_s(0, settings, rng) == 0.0
    assert next_delay_s(3, settings, rng) is None
    with pytest.raises(ValueError):
        next_delay_s(-1, settings)


def test_default_schedule_matches_the_design() -> None:
    settings = Settings(webhook_jitter=0.0)
    delays = [next_delay_s(n, settings) for n in range(9)]
    assert delays == [0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0, None]
