"""Webhook receivers that are down, failing, gone or redirecting.

Events come from a real flow that needs no model: jobs canceled while queued are
finalized by the webhooks worker, which sends their ``job.canceled`` event. The
receiver here can be stopped and started again on the same port.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from imageq.api_client.webhooks import event_id, verify
from imageq.workers.testing.services import free_port, wait_until
from tests.fixtures.services import Stack
from tests.helpers import png_uri


@dataclass
class Hit:
    path: str
    webhook_id: str
    status: int
    at: float
    headers: dict[str, str]
    body: bytes


class Receiver:
    """Answers ``status`` (per path, else ``default``); ``stop``/``start`` keep the port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.default = 200
        self.status: dict[str, int] = {}
        self.hits: list[Hit] = []
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                status = receiver.status.get(self.path, receiver.default)
                with receiver._lock:
                    receiver.hits.append(
                        Hit(
                            self.path,
                            self.headers.get("webhook-id", ""),
                            status,
                            time.monotonic(),
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                        )
                    )
                self.send_response(status)
                if status in (301, 302, 303, 307, 308):
                    self.send_header("Location", receiver.url("/redirect-target"))
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def running(self) -> bool:
        return self._server is not None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def for_path(self, path: str) -> list[Hit]:
        with self._lock:
            return [h for h in self.hits if h.path == path]


@pytest.fixture(scope="module")
def hooks() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.stop()


def _canceled_jobs(stack: Stack, url: str, count: int) -> list[str]:
    """Jobs no worker serves, canceled while queued: each ends with one final event."""
    ids = []
    for _ in range(count):
        job = stack.client.caption(image=png_uri(), webhook=url)
        assert stack.client.cancel(job.id).status == "canceled"
        ids.append(job.id)
    return ids


def _canceled_id(stack: Stack, job_id: str) -> str:
    """The final event's webhook-id, which names the job's record by its creation time."""
    return event_id(job_id, "job.canceled", stack.client.get(job_id).created_at)


def _done(stack: Stack, webhook_id: str) -> str | None:
    value = stack.redis.get(stack.store.keys.webhook_done(webhook_id))
    return None if value is None else str(value)


def test_receiver_down_then_500_then_up_gets_each_event_once(
    make_stack: Callable[..., Stack],
    hooks: Receiver,
    webhook_secret: str,
    record_property: Callable[[str, object], None],
) -> None:
    stack = make_stack(IMAGEQ_WEBHOOK_SCHEDULE_S="0,1,1,1,1,1,1,1,1,1")
    stack.worker("webhooks", "webhooks@outage")
    jobs = _canceled_jobs(stack, hooks.url("/outage"), 3)  # receiver down: refused
    ids = {_canceled_id(stack, job_id) for job_id in jobs}
    wait_until(lambda: stack.redis.zcard(stack.store.keys.webhook_due()) >= 3, 30, "retries")
    time.sleep(1.5)
    hooks.default = 500
    hooks.start()  # up, but failing
    wait_until(lambda: {h.webhook_id for h in hooks.for_path("/outage")} == ids, 30, "500s")
    time.sleep(1.0)
    hooks.default = 200  # recovered
    wait_until(lambda: all(_done(stack, i) == "delivered" for i in ids), 30, "deliveries")
    time.sleep(2.5)  # the schedule would have sent any duplicate by now

    hits = hooks.for_path("/outage")
    assert {h.webhook_id for h in hits} == ids
    for webhook_id in ids:
        mine = [h for h in hits if h.webhook_id == webhook_id]
        assert [h.status for h in mine if h.status == 200] == [200], mine
        assert mine[-1].status == 200 and any(h.status == 500 for h in mine)
        record_property(f"posts_for_{webhook_id[-17:]}", len(mine))
        payload = verify(mine[-1].headers, mine[-1].body, webhook_secret)
        assert payload["type"] == "job.canceled"
    assert stack.redis.zcard(stack.store.keys.webhook_due()) == 0


def test_410_stops_and_302_is_not_followed(
    make_stack: Callable[..., Stack], hooks: Receiver
) -> None:
    if not hooks.running:
        hooks.start()
    hooks.status["/gone"] = 410
    hooks.status["/moved"] = 302
    stack = make_stack(IMAGEQ_WEBHOOK_SCHEDULE_S="0,0.4,0.4,0.4")
    stack.worker("webhooks", "webhooks@gone")
    gone = _canceled_jobs(stack, hooks.url("/gone"), 2)
    moved = _canceled_jobs(stack, hooks.url("/moved"), 1)

    gone_ids = [_canceled_id(stack, job_id) for job_id in gone]
    wait_until(lambda: all(_done(stack, i) == "gone" for i in gone_ids), 30, "410s")
    webhook_id = _canceled_id(stack, moved[0])
    # A redirect is an answer to retry, never a place to go: the schedule runs out.
    wait_until(lambda: _done(stack, webhook_id) == "retry", 30, "302 retries spent")
    time.sleep(1.5)

    for job_id in gone:
        assert len([h for h in hooks.for_path("/gone") if job_id in h.webhook_id]) == 1
    assert [h.webhook_id for h in hooks.for_path("/moved")] == [webhook_id] * 4
    assert hooks.for_path("/redirect-target") == []


def _imageq(stack: Stack, *args: str) -> Any:
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "imageq.api_client.cli", *args],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_failed_and_gone_deliveries_are_kept_and_replayed(
    make_stack: Callable[..., Stack], hooks: Receiver, webhook_secret: str
) -> None:
    if not hooks.running:
        hooks.start()
    hooks.status["/down-long"] = 503
    hooks.status["/gone-then-back"] = 410
    stack = make_stack(IMAGEQ_WEBHOOK_SCHEDULE_S="0,0.2,0.2")
    stack.worker("webhooks", "webhooks@replay")
    failed = _canceled_jobs(stack, hooks.url("/down-long"), 2)
    gone = _canceled_jobs(stack, hooks.url("/gone-then-back"), 1)
    failed_ids = {_canceled_id(stack, job_id) for job_id in failed}
    gone_id = _canceled_id(stack, gone[0])
    wait_until(lambda: all(_done(stack, i) == "retry" for i in failed_ids), 30, "retries spent")
    wait_until(lambda: _done(stack, gone_id) == "gone", 30, "410")

    listed = _imageq(stack, "webhooks", "list")
    assert {k["webhook_id"] for k in listed} == failed_ids | {gone_id}
    only_failed = _imageq(stack, "webhooks", "list", "--failed", "--since", "10m")
    assert {k["webhook_id"] for k in only_failed} == failed_ids
    assert all(k["attempts"] == 3 and k["type"] == "job.canceled" for k in only_failed)
    assert [k["webhook_id"] for k in _imageq(stack, "webhooks", "list", "--gone")] == [gone_id]

    # The consumers come back: replay one job's delivery, then everything since a time.
    hooks.status["/down-long"] = 200
    hooks.status["/gone-then-back"] = 200
    first = sorted(failed)[0]
    replayed = _imageq(stack, "webhooks", "replay", "--job", first)["replayed"]
    assert replayed == [_canceled_id(stack, first)]
    wait_until(lambda: _done(stack, replayed[0]) == "delivered", 30, "replayed delivery")
    rest = _imageq(stack, "webhooks", "replay", "--since", "1h")["replayed"]
    assert set(rest) == (failed_ids | {gone_id}) - set(replayed)
    wait_until(
        lambda: all(_done(stack, i) == "delivered" for i in failed_ids | {gone_id}), 30, "all"
    )
    for webhook_id in failed_ids | {gone_id}:
        path = "/gone-then-back" if webhook_id == gone_id else "/down-long"
        mine = [h for h in hooks.for_path(path) if h.webhook_id == webhook_id]
        delivered = [h for h in mine if h.status == 200]
        assert len(delivered) == 1, mine
        # Same id, a fresh signature timestamp, and it verifies.
        assert int(delivered[0].headers["webhook-timestamp"]) >= int(
            mine[0].headers["webhook-timestamp"]
        )
        assert verify(delivered[0].headers, delivered[0].body, webhook_secret)["type"] == (
            "job.canceled"
        )
    assert _imageq(stack, "webhooks", "list") == []
