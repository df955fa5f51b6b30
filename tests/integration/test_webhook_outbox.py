"""Scheduled webhook retries move from the due set into the queue once, and never get lost
on the way: a failed or interrupted send leaves them due."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from imageq.api_client.records import RecordStore, connect
from imageq.api_client.settings import Settings
from imageq.workers.testing.services import RedisServer
from imageq.workers.webhooks.outbox import WebhookDispatcher
from imageq.workers.webhooks.post import WebhookEvent


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[RecordStore]:
    s = Settings.from_env(
        {}, broker_url=redis_server.url, queue_prefix=f"ob-{uuid.uuid4().hex[:6]}-"
    )
    store = RecordStore(connect(s.records_redis_url), s)
    yield store
    store.redis.close()


def _event(n: int = 0) -> WebhookEvent:
    return WebhookEvent(f"msg_job{n}_succeeded", "https://example.com/h", "job.succeeded", "t")


def _due(store: RecordStore) -> list[str]:
    return [str(m) for m in store.redis.zrangebyscore(store.keys.webhook_due(), "-inf", "+inf")]


def test_a_failed_enqueue_leaves_the_retry_due_for_the_next_pump(store: RecordStore) -> None:
    def broker_down(event: WebhookEvent) -> None:
        raise ConnectionError("broker away")

    failing = WebhookDispatcher(store, broker_down)
    failing.schedule(_event(), -1)
    with pytest.raises(ConnectionError):
        failing.pump()
    assert len(_due(store)) == 1
    sent: list[WebhookEvent] = []
    assert WebhookDispatcher(store, sent.append).pump() == 1
    assert [(e.webhook_id, e.attempt) for e in sent] == [("msg_job0_succeeded", 1)]
    assert _due(store) == []


def test_a_pump_that_dies_mid_send_leaves_the_retry_due_after_the_window(
    store: RecordStore,
) -> None:
    def die(event: WebhookEvent) -> None:
        raise SystemExit  # the worker's process dies inside the send

    dying = WebhookDispatcher(store, die, in_flight_s=1.5)
    dying.schedule(_event(), -1)
    with pytest.raises(SystemExit):
        dying.pump()
    sent: list[WebhookEvent] = []
    other = WebhookDispatcher(store, sent.append, in_flight_s=1.5)
    assert other.pump() == 0 and len(_due(store)) == 1  # in flight: not sent twice
    time.sleep(1.6)
    assert other.pump() == 1 and [e.webhook_id for e in sent] == ["msg_job0_succeeded"]
    assert _due(store) == []


def test_pumps_racing_enqueue_each_retry_once(store: RecordStore) -> None:
    sent: list[str] = []
    lock = threading.Lock()
    pumps: list[WebhookDispatcher] = []

    def enqueue(event: WebhookEvent) -> None:
        with lock:
            sent.append(event.webhook_id)

    pumps.extend(WebhookDispatcher(store, enqueue) for _ in range(4))
    for n in range(40):
        pumps[0].schedule(_event(n), -1)
    barrier = threading.Barrier(len(pumps))

    def pump(dispatcher: WebhookDispatcher) -> None:
        barrier.wait()
        while dispatcher.pump():
            pass

    threads = [threading.Thread(target=pump, args=(p,)) for p in pumps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(sent) == sorted(f"msg_job{n}_succeeded" for n in range(40))
    assert _due(store) == []


def test_a_pump_sending_one_retry_is_not_copied_by_another(store: RecordStore) -> None:
    sent: list[str] = []
    other = WebhookDispatcher(store, lambda e: sent.append("other:" + e.webhook_id))

    def enqueue(event: WebhookEvent) -> None:
        assert other.pump() == 0  # it is in flight, sent by this pump
        sent.append(event.webhook_id)

    first = WebhookDispatcher(store, enqueue)
    first.schedule(_event(), -1)
    assert first.pump() == 1
    assert sent == ["msg_job0_succeeded"] and _due(store) == []
