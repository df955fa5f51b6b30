"""Kept deliveries: bounded in count and age, listed newest first, taken once."""

from __future__ import annotations

import time
import uuid

import pytest

from api_client.records import RecordStore, connect
from api_client.settings import Settings
from api_client.webhook_log import KeptOutcome, WebhookLog, parse_since
from workers.testing.services import RedisServer


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


def test_take_returns_a_fresh_attempt_once(redis_server: RedisServer) -> None:
    log = _log(redis_server)
    log.keep(_event(1), KeptOutcome.FAILED)
    done = log.store.key("wh", "msg_job1_succeeded", "done")
    log.store.redis.set(done, "retry")
    event = log.take("msg_job1_succeeded")
    assert event is not None and event["attempt"] == 0 and event["url"].endswith("token=t1")
    assert log.store.redis.get(done) is None
    assert log.take("msg_job1_succeeded") is None
    assert log.listing() == []


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
