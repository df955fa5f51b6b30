"""Kept deliveries: bounded in count and age, listed newest first, taken once."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from imageq.api_client.client import Client
from imageq.api_client.records import RecordStore, connect
from imageq.api_client.settings import Settings
from imageq.api_client.webhook_log import KeptOutcome, WebhookLog, parse_since
from imageq.workers.testing.services import RedisServer


def _log(redis_server: RedisServer, **settings: int) -> WebhookLog:
    s = Settings.from_env(
        {}, broker_url=redis_server.url, queue_prefix=f"wl-{uuid.uuid4().hex[:6]}-", **settings
    )
    return WebhookLog(RecordStore(connect(s.records_redis_url), s))


def _event(n: int) -> dict:
    return {
        "webhook_id": f"msg_job{n}_succeeded",
        "url": f"https://user:secret@example.com/hook?token=t{n}",
        "type": "job.succeeded",
        "timestamp": "2026-11-30T00:00:00Z",
        "data": {"id": f"job{n}"},
        "attempt": 7,
    }


def test_bounded_by_count_newest_kept(redis_server: RedisServer) -> None:
    log = _log(redis_server, webhook_keep_max=3)
    for n in range(5):
        log.keep(_event(n), KeptOutcome.FAILED if n % 2 else KeptOutcome.GONE)
        time.sleep(0.002)
    listed = log.listing()
    assert [k.job_id for k in listed] == ["job4", "job3", "job2"]
    assert [k.outcome for k in listed] == ["gone", "failed", "gone"]
    # Listings never show the URL's credentials or query.
    assert all("secret" not in k.url and "token" not in k.url for k in listed)
    assert [k.job_id for k in log.listing(outcome=KeptOutcome.FAILED)] == ["job3"]
    assert [k.job_id for k in log.listing(job_id="job2")] == ["job2"]


def test_replay_sends_a_fresh_attempt_once(redis_server: RedisServer) -> None:
    log = _log(redis_server)
    log.keep(_event(1), KeptOutcome.FAILED)
    done = log.store.keys.webhook_done("msg_job1_succeeded")
    log.store.redis.set(done, "retry")
    sent: list[dict[str, Any]] = []
    assert log.replay("msg_job1_succeeded", sent.append)
    (event,) = sent
    assert event["attempt"] == 0 and event["url"].endswith("token=t1")
    assert log.store.redis.get(done) is None
    assert not log.replay("msg_job1_succeeded", sent.append) and len(sent) == 1
    assert log.listing() == []


def test_an_entry_kept_again_while_it_was_sent_stays_kept(redis_server: RedisServer) -> None:
    log = _log(redis_server)
    log.keep(_event(1), KeptOutcome.FAILED)

    def failed_again(event: dict[str, Any]) -> None:
        time.sleep(0.002)  # a later kept_at: delivered at once, failed, kept again
        log.keep({**_event(1), "attempt": 9}, KeptOutcome.GONE)

    assert log.replay("msg_job1_succeeded", failed_again)
    assert [(k.outcome, k.attempts) for k in log.listing()] == [(KeptOutcome.GONE, 10)]


def test_old_entries_age_out(redis_server: RedisServer) -> None:
    log = _log(redis_server, webhook_keep_s=1)
    log.keep(_event(1), KeptOutcome.FAILED)
    assert len(log.listing()) == 1
    time.sleep(1.2)
    assert log.listing() == []


def test_since_accepts_ages_and_iso_times() -> None:
    assert parse_since("2h", now=10_000.0) == 10_000.0 - 7200
    assert parse_since("90s", now=100.0) == 10.0
    assert parse_since("2026-11-30T12:00:00Z") == parse_since("2026-11-30T12:00:00+00:00")
    with pytest.raises(ValueError, match="since"):
        parse_since("yesterday")


class Broker:
    """Stands for the client's Celery app: records what was sent, or is down."""

    def __init__(self, log: WebhookLog) -> None:
        self.log = log
        self.down = False
        self.sent: list[dict[str, Any]] = []

    def send_task(self, name: str, *, args: list[Any], **options: Any) -> None:
        if self.down:
            raise ConnectionError("broker away")
        # Its done mark is cleared before the send: the webhooks worker must not drop it.
        done = self.log.store.keys.webhook_done(args[0]["webhook_id"])
        assert self.log.store.redis.get(done) is None
        self.sent.append(args[0])


def _client(log: WebhookLog, monkeypatch: pytest.MonkeyPatch) -> tuple[Client, Broker]:
    client = Client(log.settings)
    broker = Broker(log)
    monkeypatch.setattr(client, "_app", lambda long_jobs: broker)
    return client, broker


def test_a_replay_the_broker_refused_stays_kept_and_is_sent_by_the_next(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _log(redis_server)
    log.keep(_event(1), KeptOutcome.FAILED)
    log.store.redis.set(log.store.keys.webhook_done("msg_job1_succeeded"), "retry")
    client, broker = _client(log, monkeypatch)
    broker.down = True
    with pytest.raises(ConnectionError):
        client.replay_webhooks("msg_job1_succeeded")
    assert [k.webhook_id for k in log.listing()] == ["msg_job1_succeeded"]
    broker.down = False
    assert client.replay_webhooks("msg_job1_succeeded") == ["msg_job1_succeeded"]
    assert [(e["webhook_id"], e["attempt"]) for e in broker.sent] == [("msg_job1_succeeded", 0)]
    assert log.listing() == []
    assert client.replay_webhooks("msg_job1_succeeded") == [] and len(broker.sent) == 1


def test_replaying_all_keeps_what_the_broker_refused(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _log(redis_server)
    for n in range(3):
        log.keep(_event(n), KeptOutcome.FAILED)
        time.sleep(0.002)
    client, broker = _client(log, monkeypatch)
    send = broker.send_task

    def second_fails(name: str, *, args: list[Any], **options: Any) -> None:
        if args[0]["webhook_id"] == "msg_job1_succeeded":
            raise ConnectionError("broker away")
        send(name, args=args, **options)

    monkeypatch.setattr(broker, "send_task", second_fails)
    with pytest.raises(ConnectionError):
        client.replay_webhooks()
    assert [k.job_id for k in log.listing()] == ["job1", "job0"]
    monkeypatch.setattr(broker, "send_task", send)
    assert client.replay_webhooks() == ["msg_job1_succeeded", "msg_job0_succeeded"]
    assert [e["webhook_id"] for e in broker.sent] == [f"msg_job{n}_succeeded" for n in (2, 1, 0)]
    assert log.listing() == []
