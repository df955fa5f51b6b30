"""The live worker registry and the backlog read from it, against a real Redis."""

from __future__ import annotations

import itertools
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from imageq.api_client.queues import live_workers, priority_lists, reserved_by_queue
from imageq.api_client.records import RecordStore, connect
from imageq.api_client.settings import Settings
from imageq.workers.ops.live_workers import WorkerRegistry
from imageq.workers.ops.metrics import Metrics, WorkerView
from imageq.workers.testing.services import RedisServer

_n = itertools.count()


@pytest.fixture
def store(redis_server: RedisServer) -> RecordStore:
    settings = Settings.from_env(
        {}, broker_url=redis_server.url, queue_prefix=f"reg{next(_n)}-", worker_kind="caption"
    )
    return RecordStore(connect(redis_server.url), settings)


def registry(store: RecordStore, name: str, **kw: Any) -> WorkerRegistry:
    return WorkerRegistry(store, name, {"kind": "caption", "queues": []}, **kw)


def test_a_finished_job_is_published_at_once(store: RecordStore) -> None:
    # A beat every minute: only publishing on finish explains what readers see.
    reg = registry(store, "caption-a@test", every_s=60)
    reg.start()
    try:
        reg.job_started("job-1", "caption")
        reg.publish()  # the heartbeat
        assert live_workers(store)[0]["current"] == {"job-1": "caption"}
        reg.job_finished("job-1")
        seen = live_workers(store)[0]
        assert seen["processed"] == 1 and seen["current"] == {}
        # A delivery that did not end its job (a retry) leaves the count alone.
        reg.job_started("job-2", "caption")
        reg.job_finished("job-2", done=False)
        assert live_workers(store)[0]["processed"] == 1
    finally:
        reg.stop()


def test_a_batch_ending_at_once_is_counted_whole(store: RecordStore) -> None:
    """Many threads finish together; a late write of an older snapshot must not win."""
    reg = registry(store, "caption-b@test", every_s=60)
    reg.start()
    go = threading.Event()

    def finish(i: int) -> None:
        reg.job_started(f"job-{i}", "caption")
        go.wait()
        reg.job_finished(f"job-{i}")

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    go.set()
    for thread in threads:
        thread.join()
    try:
        assert live_workers(store)[0]["processed"] == 32
    finally:
        reg.stop()


def test_live_workers_come_from_the_index(store: RecordStore) -> None:
    a = registry(store, "caption-c@test", reserved=lambda: {"q-caption": 2})
    b = registry(store, "match-c@test", reserved=lambda: {"q-caption": 1, "q-match": 4})
    a.start()
    b.start()
    try:
        workers = live_workers(store)
        assert [w["name"] for w in workers] == ["caption-c@test", "match-c@test"]
        assert reserved_by_queue(workers) == {"q-caption": 3, "q-match": 4}
        # A worker that stops says goodbye; one whose key expired is not listed either.
        a.stop()
        assert [w["name"] for w in live_workers(store)] == ["match-c@test"]
        store.redis.zadd(store.keys.workers(), {"ghost@test": time.time() - 1})
        assert [w["name"] for w in live_workers(store)] == ["match-c@test"]
    finally:
        b.stop()
    assert live_workers(store) == []


def test_a_broken_reserved_count_never_stops_the_heartbeat(store: RecordStore) -> None:
    def broken() -> dict[str, int]:
        raise RuntimeError("celery state changed under us")

    reg = registry(store, "caption-d@test", reserved=broken)
    reg.start()
    try:
        assert live_workers(store)[0]["reserved"] == {}
    finally:
        reg.stop()


def test_metrics_backlog_is_depth_plus_reserved(store: RecordStore) -> None:
    settings = store.settings
    caption = settings.queue_prefix + "caption"
    # Two messages waiting at two priorities, three reserved by a live worker.
    store.redis.lpush(priority_lists(caption)[0], "m1")
    store.redis.lpush(priority_lists(caption)[5], "m2")
    reg = registry(store, "caption-e@test", reserved=lambda: {caption: 3})
    reg.start()
    view = WorkerView(name="w", kind="caption", device="cpu", model="m", model_load_s=0.1)
    metrics = Metrics(settings, view)
    try:
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
            for s in family.samples
        }
    finally:
        reg.stop()
        store.redis.delete(*priority_lists(caption))
    assert samples[("imageq_queue_depth", (("queue", caption),))] == 2
    assert samples[("imageq_queue_backlog", (("queue", caption),))] == 5
    match = settings.queue_prefix + "match"
    assert samples[("imageq_queue_backlog", (("queue", match),))] == 0


def test_the_rate_counts_the_last_minute_even_when_idle(
    store: RecordStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imageq.workers.ops.live_workers as module

    now = [1000.0]
    # The registry's clock only: the Redis client and the registry's thread keep theirs.
    clock = SimpleNamespace(monotonic=lambda: now[0], time=time.time)
    monkeypatch.setattr(module, "time", clock)
    reg = registry(store, "caption-f@test", every_s=60)
    for i in range(5):
        reg.job_started(f"job-{i}", "caption")
        reg.job_finished(f"job-{i}")
        now[0] += 10
    assert reg.snapshot()["jobs_per_min"] == 5
    now[0] += 25  # the first two are more than a minute old now, and nothing ended since
    assert reg.snapshot()["jobs_per_min"] == 3
    assert reg.snapshot()["processed"] == 5
