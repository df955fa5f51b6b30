"""A run's transitions, one script each, and the worker's one lease and cancel thread,
against a real Redis (workers/runtime/transitions.py, workers/runtime/leases.py)."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Iterator

import pytest

from imageq.api_client.records import RecordStore, connect, final_record, new_record
from imageq.api_client.schemas import JobRecord, JobStatus, parse_job
from imageq.api_client.settings import Settings
from imageq.workers.runtime.control import LeaseKeeper
from imageq.workers.runtime.failover import RunningSet
from imageq.workers.runtime.jobstate import JobState
from imageq.workers.runtime.leases import Heart
from imageq.workers.runtime.transitions import RunRecord, Transitions
from imageq.workers.testing.services import RedisServer, wait_until

_n = itertools.count()


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[RecordStore]:
    settings = Settings.from_env(
        {}, broker_url=redis_server.url, queue_prefix=f"tr{next(_n)}-", lease_ttl_s=5
    )
    store = RecordStore(connect(redis_server.url), settings)
    yield store
    store.redis.close()


def _document(**extra: object) -> dict[str, object]:
    doc = {"id": str(uuid.uuid4()), "kind": "caption", "input": {"image": "https://x/y.png"}}
    return parse_job({**doc, **extra}).wire()


def _started(store: RecordStore, transitions: Transitions, token: str) -> RunRecord:
    doc = _document()
    store.create(new_record(doc), doc)
    claimed = transitions.claim(lambda: new_record(doc), doc, token, served=True)
    assert claimed.state == "leased"
    running = claimed.record.model_copy(update={"status": JobStatus.RUNNING, "attempt": 1})
    assert transitions.start(running.id, claimed.raw, running) is None
    return RunRecord(running, claimed.document, token)


def test_a_raw_message_gets_its_record_and_the_lease_in_one_claim(store: RecordStore) -> None:
    transitions = Transitions(store)
    doc = _document(tenant="acme")
    claimed = transitions.claim(lambda: new_record(doc), doc, "w/1", served=True)
    assert claimed.state == "leased" and claimed.record.status == "queued"
    assert store.get_document(str(doc["id"])) == doc
    assert str(doc["id"]) in store.list_ids(tenant="acme")
    assert JobState(store).lease_holder(str(doc["id"])) == "w/1"
    assert RunningSet(store).score(str(doc["id"])) is not None
    # The same worker may take its own lease back; another one waits.
    assert transitions.claim(lambda: new_record(doc), doc, "w/1", served=True).state == "leased"
    assert transitions.claim(lambda: new_record(doc), doc, "w/2", served=True).state == "held"


def test_final_canceled_and_unserved_jobs_are_refused_before_the_lease(
    store: RecordStore,
) -> None:
    transitions = Transitions(store)
    final, canceled, unserved = _document(), _document(), _document()
    for doc in (final, canceled, unserved):
        store.create(new_record(doc), doc)
    store.finish(str(final["id"]), JobStatus.SUCCEEDED, output={})
    store.request_cancel(str(canceled["id"]))
    cases = [(final, True, "final"), (canceled, True, "canceled"), (unserved, False, "unserved")]
    for doc, served, state in cases:
        claimed = transitions.claim(lambda d=doc: new_record(d), doc, "w/1", served=served)
        assert claimed.state == state
        assert JobState(store).lease_holder(str(doc["id"])) is None


def test_start_is_a_compare_and_set(store: RecordStore) -> None:
    transitions = Transitions(store)
    doc = _document()
    store.create(new_record(doc), doc)
    claimed = transitions.claim(lambda: new_record(doc), doc, "w/1", served=True)
    store.update(str(doc["id"]), lambda r: r.model_copy(update={"metadata": {"changed": 1}}))
    running = claimed.record.model_copy(update={"status": JobStatus.RUNNING, "attempt": 1})
    found = transitions.start(running.id, claimed.raw, running)
    assert found is not None and json.loads(found)["metadata"] == {"changed": 1}
    record = store.get(running.id)
    assert record is not None and record.status == "queued"


def test_writes_only_over_this_runs_attempt_and_lease(store: RecordStore) -> None:
    transitions = Transitions(store)
    run = _started(store, transitions, "w/1")
    job_id = run.record.id
    progress = run.record.model_copy(update={"progress": {"step": 1, "total": 2}})
    assert transitions.write(run, progress)[0] == "ok"
    assert run.record.progress == {"step": 1, "total": 2}
    # Lapsed while frozen, nobody took it: the final write takes it back.
    store.redis.delete(store.keys.lease(job_id))
    done = final_record(run.record, JobStatus.SUCCEEDED, output={"ok": True})
    state, _ = transitions.write(run, done, final=True, result_written=True, release=["counted"])
    assert state == "ok"
    record = store.get(job_id)
    assert record is not None and record.status == "succeeded"
    assert JobState(store).done_once(job_id, "result.json") and JobState(store).done_once(
        job_id, "counted"
    )
    assert JobState(store).lease_holder(job_id) is None and RunningSet(store).score(job_id) is None
    # Final now: nothing more is written.
    assert transitions.write(run, progress)[0] == "final"


def test_a_newer_attempt_or_another_holder_refuses_the_write(store: RecordStore) -> None:
    transitions = Transitions(store)
    run = _started(store, transitions, "w/1")
    job_id = run.record.id
    done = final_record(run.record, JobStatus.SUCCEEDED, output={})
    store.redis.set(store.keys.lease(job_id), "w/2")
    state, found = transitions.write(run, done, final=True, result_written=True)
    assert state == "lost" and found is not None and found.status == "running"
    store.update(job_id, lambda r: r.model_copy(update={"attempt": 2}))
    state, found = transitions.write(run, run.record.model_copy(update={"progress": {}}))
    assert state == "moved" and found is not None and found.attempt == 2
    transitions.release(job_id, "w/1", ["webhook:job.succeeded"])
    assert JobState(store).lease_holder(job_id) == "w/2"  # the holder's, untouched
    assert JobState(store).done_once(job_id, "webhook:job.succeeded")


def test_the_heart_renews_every_lease_and_sees_a_takeover(store: RecordStore) -> None:
    heart = Heart(store, every_s=0.2)
    try:
        keepers = []
        for i in range(3):
            job_id = f"job-{i}"
            store.create(
                JobRecord(
                    id=job_id,
                    kind="caption",
                    status="running",
                    attempt=1,
                    created_at="2026-01-01T00:00:00Z",
                ),
                {"id": job_id},
            )
            assert JobState(store).acquire_lease(job_id, f"w/{i}")
            keeper = LeaseKeeper(store, job_id, f"w/{i}", 0.2, RunningSet(store), heart=heart)
            keeper.attempt = 1
            keeper.__enter__()
            keepers.append(keeper)
        store.redis.set(store.keys.lease("job-2"), "other/1")
        time.sleep(1.0)
        ttl_ms = store.redis.pttl(store.keys.lease("job-0"))
        assert ttl_ms > 4000  # renewed (TTL 5 s) several times by now
        assert not keepers[0].lost and keepers[2].lost
        for keeper in keepers:
            keeper.release()
        assert (
            JobState(store).lease_holder("job-0") is None
            and JobState(store).lease_holder("job-2") == "other/1"
        )
    finally:
        heart.stop()


def test_the_cancel_set_hears_every_process(store: RecordStore, redis_server: RedisServer) -> None:
    heart = Heart(store, every_s=0.2)
    other = RecordStore(connect(redis_server.url), store.settings)
    try:
        heart.watch("a")
        heart.watch("b")
        wait_until(lambda: heart.canceled("a") is False, 5, "the subscription")
        store.request_cancel("a")  # this process: at once
        assert heart.canceled("a") is True
        other.request_cancel("b")  # another process: over pub/sub
        wait_until(lambda: heart.canceled("b") is True, 5, "the cancel message")
        assert heart.canceled("c") is None  # not watched: ask Redis
        heart.unwatch("a")
        heart.watch("a")
        # Forgotten with its watch; a missed message is still found in the key.
        wait_until(lambda: heart.canceled("a") is True, 5, "the cancel key read every beat")
    finally:
        other.redis.close()
        heart.stop()


def test_a_final_write_that_is_not_this_runs_marks_its_result_json_stale_at_once(
    store: RecordStore,
) -> None:
    """In the same script: no newer run can end the job between this run's refused
    write and its mark, and so keep the stale run's result.json."""
    transitions = Transitions(store)
    run = _started(store, transitions, "w/1")
    job_id = run.record.id
    once = store.keys.once(job_id)
    done = final_record(run.record, JobStatus.SUCCEEDED, output={})
    store.update(job_id, lambda r: r.model_copy(update={"attempt": 2}))
    state, _ = transitions.write(run, done, final=True, result_written=True)
    assert state == "moved" and store.redis.hexists(once, "result.json:stale")
    store.redis.hdel(once, "result.json:stale")
    store.update(job_id, lambda r: r.model_copy(update={"attempt": 1}))
    store.redis.set(store.keys.lease(job_id), "w/2")
    state, _ = transitions.write(run, done, final=True, result_written=True)
    assert state == "lost" and store.redis.hexists(once, "result.json:stale")
    # A refused progress write wrote no result.json: nothing to mark.
    store.redis.hdel(once, "result.json:stale")
    store.update(job_id, lambda r: r.model_copy(update={"attempt": 2}))
    state, _ = transitions.write(run, run.record.model_copy(update={"progress": {}}))
    assert state == "moved" and not store.redis.hexists(once, "result.json:stale")
    # The job ends meanwhile: the late run is told, not marked.
    store.finish(job_id, JobStatus.SUCCEEDED, output={})
    assert transitions.mark_result_stale(job_id) is False
    assert not store.redis.hexists(once, "result.json:stale")
