"""Failover, lease loss, hand-back and once-only final side effects against a real Redis,
without Celery: several runners and sweepers share one Redis as a fleet's workers do."""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imageq.api_client.error_details import ErrorDetails
from imageq.api_client.errors import TransientError
from imageq.api_client.records import Document, RecordStore, connect, new_record
from imageq.api_client.schemas import JobDocument, JobStatus, parse_job
from imageq.api_client.settings import Settings
from imageq.api_client.webhooks import event_id
from imageq.workers.io.storage import LocalStorage
from imageq.workers.runtime.control import JobControl, LeaseKeeper, LeaseLost
from imageq.workers.runtime.failover import FailoverSweeper, RunningSet, resend_grace_s
from imageq.workers.runtime.jobstate import JobState
from imageq.workers.runtime.lifecycle import Deferred, JobRunner, WorkerContext
from imageq.workers.testing.services import RedisServer, WebhookReceiver
from imageq.workers.webhooks.outbox import WebhookDispatcher
from imageq.workers.webhooks.post import WebhookEvent

_n = itertools.count()


class Handler:
    """Steps through a job; ``on_step`` lets a test act in the middle of a run."""

    def __init__(self) -> None:
        self.calls = 0
        self.steps = 3
        self.on_step: Any = None

    def handle(self, job: JobDocument, inp: Any, control: JobControl) -> dict[str, Any]:
        self.calls += 1
        for step in range(1, self.steps + 1):
            if self.on_step is not None:
                self.on_step(step, control)
            control(step, self.steps, {"stage": "denoising"})
        ref = self.ctx.put_output(job.id, "out.txt", b"x", "text/plain")
        return {"file": ref}

    ctx: WorkerContext


@dataclass
class Worker:
    """One simulated worker process: its runner, its sweeper and what it sent."""

    runner: JobRunner
    handler: Handler
    sweeper: FailoverSweeper
    webhooks: list[WebhookEvent] = field(default_factory=list)
    jobs: list[Document] = field(default_factory=list)


@pytest.fixture
def fleet(redis_server: RedisServer, tmp_path: Path) -> Iterator[Any]:
    prefix = f"fo{next(_n)}-"
    made: list[Worker] = []

    def make(name: str, **overrides: Any) -> Worker:
        values: dict[str, Any] = {
            "broker_url": redis_server.url,
            "queue_prefix": prefix,
            "storage_url": f"file://{tmp_path}",
            "max_attempts": 3,
            "storage_retries": 1,
            "storage_retry_base_s": 0.01,
        }
        settings = Settings.from_env({}, **{**values, **overrides})
        store = RecordStore(connect(redis_server.url), settings)
        webhooks: list[WebhookEvent] = []
        jobs: list[Document] = []
        ctx = WorkerContext(
            settings=settings,
            store=store,
            storage=LocalStorage(tmp_path),
            send_webhook=webhooks.append,
            worker_name=name,
            model_id="tiny",
            send_job=jobs.append,
        )
        handler = Handler()
        handler.ctx = ctx
        runner = JobRunner(ctx, {"caption": handler})
        sweeper = FailoverSweeper(
            store, jobs.append, runner.finalize, runner.fail_lost, every_s=1, worker_name=name
        )
        worker = Worker(runner, handler, sweeper, webhooks, jobs)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.runner.store.redis.close()


def _doc() -> Document:
    """A job document as the client stores it (defaults filled in)."""
    return parse_job(
        {
            "id": str(uuid.uuid4()),
            "kind": "caption",
            "input": {"image": "https://example.com/x.png"},
            "webhook": {"url": "https://example.com/hook"},
        }
    ).wire()


def _died_mid_run(worker: Worker, doc: Document) -> None:
    """What a SIGKILL leaves: a running record, its lease expired, the job still watched."""
    store = worker.runner.store
    store.create(new_record(doc), doc)
    store.update(
        doc["id"], lambda r: r.model_copy(update={"status": JobStatus.RUNNING, "attempt": 1})
    )
    RunningSet(store).watch(doc["id"], -1)


def test_a_lapsed_lease_is_redispatched_exactly_once_by_many_sweepers(fleet: Any) -> None:
    sweepers = [fleet(f"w{i}") for i in range(4)]
    doc = _doc()
    _died_mid_run(sweepers[0], doc)
    barrier = threading.Barrier(len(sweepers))

    def sweep(worker: Worker) -> None:
        barrier.wait()
        worker.sweeper.sweep()

    threads = [threading.Thread(target=sweep, args=(w,)) for w in sweepers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sent = [job for w in sweepers for job in w.jobs]
    assert [job["id"] for job in sent] == [doc["id"]]
    assert sent[0] == sweepers[0].runner.store.get_document(doc["id"])
    # A second pass finds nothing: the lapse was claimed.
    assert all(w.sweeper.sweep() == [] for w in sweepers)

    # The re-sent job runs as attempt 2 and succeeds; the broker's own redelivery of the
    # dead worker's message later is a no-op.
    runner = sweepers[1].runner
    record = runner.execute(sent[0], "t")
    assert record is not None and record.status == "succeeded" and record.attempt == 2
    assert runner.execute(doc, "t") is None
    assert sweepers[1].handler.calls == 1
    assert [e.type for e in sweepers[1].webhooks] == ["job.succeeded"]
    assert RunningSet(runner.store).score(doc["id"]) is None


def test_a_live_lease_is_left_alone_and_looked_at_again_later(fleet: Any) -> None:
    worker = fleet("w")
    doc = _doc()
    _died_mid_run(worker, doc)
    store = worker.runner.store
    assert JobState(store).acquire_lease(doc["id"], "slow-worker/1")
    assert worker.sweeper.sweep() == [] and worker.jobs == []
    score = RunningSet(store).score(doc["id"])
    assert score is not None and score > 0
    assert RunningSet(store).due() == []


def test_max_attempts_ends_it_as_worker_lost_with_result_json_first(
    fleet: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = fleet("w", max_attempts=1)
    doc = _doc()
    _died_mid_run(worker, doc)
    store = worker.runner.store
    seen: list[str] = []
    storage = worker.runner.ctx.storage
    put = storage.put

    def checked_put(key: str, data: bytes, content_type: str) -> str:
        # result.json lands while the record is not final yet.
        current = store.get(doc["id"])
        assert current is not None
        seen.append(str(current.status))
        return put(key, data, content_type)

    monkeypatch.setattr(storage, "put", checked_put)
    assert worker.sweeper.sweep() == [(doc["id"], "redispatch")]
    (job,) = worker.jobs
    record = worker.runner.execute(job, "t")
    assert record is not None and record.status == "failed" and record.attempt == 1
    assert record.error is not None and record.error.code == "worker_lost"
    assert seen == ["running"] and worker.handler.calls == 0
    result = json.loads(storage.get(f"jobs/{doc['id']}/result.json"))
    assert result["error"]["code"] == "worker_lost"


def test_a_worker_that_died_between_the_final_record_and_the_event_is_completed(
    fleet: Any,
) -> None:
    dead, sweeper = fleet("dead"), fleet("sweeper")
    doc = _doc()
    store = dead.runner.store
    store.create(new_record(doc), doc)
    store.finish(doc["id"], JobStatus.SUCCEEDED, output={"captions": []})
    RunningSet(store).watch(doc["id"], -1)
    assert sweeper.sweeper.sweep() == [(doc["id"], "finalize")]
    record = store.get(doc["id"])
    assert record is not None
    final_id = event_id(doc["id"], "job.succeeded", record.created_at)
    assert [e.webhook_id for e in sweeper.webhooks] == [final_id]
    assert sweeper.runner.ctx.storage.exists(f"jobs/{doc['id']}/result.json")
    assert sweeper.jobs == [] and sweeper.sweeper.sweep() == []


def test_the_final_event_is_sent_before_it_is_marked_done(fleet: Any) -> None:
    """A crash between sending and marking sends it again (same id); never zero times."""
    worker = fleet("w")
    doc = _doc()
    store = worker.runner.store
    store.create(new_record(doc), doc)
    store.finish(doc["id"], JobStatus.SUCCEEDED, output={})
    record = store.get(doc["id"])
    assert record is not None

    def crash(event: WebhookEvent) -> None:
        raise KeyboardInterrupt  # stands for the process dying inside the send

    worker.runner.ctx.send_webhook = crash
    with pytest.raises(KeyboardInterrupt):
        worker.runner.emit(doc["id"], "job.succeeded", record)
    assert not JobState(store).done_once(doc["id"], "webhook:job.succeeded")
    worker.runner.ctx.send_webhook = worker.webhooks.append
    worker.runner.finalize(doc["id"])
    worker.runner.finalize(doc["id"])
    assert [e.type for e in worker.webhooks] == ["job.succeeded"]


def test_the_webhooks_worker_delivers_one_webhook_id_once(
    fleet: Any, receiver: WebhookReceiver
) -> None:
    worker = fleet(
        "w", webhook_secret="whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", allow_private_urls=True
    )
    dispatcher = WebhookDispatcher(worker.runner.store, lambda e: None)
    event_id = f"msg_{uuid.uuid4()}_succeeded"

    def event() -> WebhookEvent:
        return WebhookEvent(event_id, receiver.url("/once"), "job.succeeded", "t", {"id": "x"})

    assert dispatcher.handle(event()) == "delivered"
    assert dispatcher.handle(event()) == "duplicate"
    assert len([d for d in receiver.deliveries if d.headers["webhook-id"] == event_id]) == 1


def test_a_run_that_lost_its_lease_stops_and_records_nothing(fleet: Any) -> None:
    worker = fleet("w")
    doc = _doc()
    store = worker.runner.store

    def taken_over(step: int, control: JobControl) -> None:
        if step == 2:  # this worker stalled; another one took the job
            store.redis.set(store.keys.lease(doc["id"]), "other/1")
            store.update(doc["id"], lambda r: r.model_copy(update={"attempt": 2}))

    worker.handler.on_step = taken_over
    assert worker.runner.execute(doc, "t") is None
    record = store.get(doc["id"])
    assert record is not None and record.status == "running" and record.attempt == 2
    assert record.progress is not None and record.progress["step"] == 1
    assert not worker.runner.ctx.storage.exists(f"jobs/{doc['id']}/out.txt")
    assert [e.type for e in worker.webhooks] == []
    # The holder's lease and its place in the running set are left alone.
    assert JobState(store).lease_holder(doc["id"]) == "other/1"
    assert RunningSet(store).score(doc["id"]) is not None


def test_a_stalled_run_finds_its_job_moved_on_even_with_no_lease_left(fleet: Any) -> None:
    """SIGSTOP past the TTL, SIGCONT after the other run finished and released it."""
    worker = fleet("w")
    store = worker.runner.store
    doc = _doc()
    store.create(new_record(doc), doc)
    store.update(
        doc["id"], lambda r: r.model_copy(update={"status": JobStatus.RUNNING, "attempt": 1})
    )
    assert JobState(store).acquire_lease(doc["id"], "me/1")
    keeper = LeaseKeeper(store, doc["id"], "me/1", every_s=60)
    keeper.attempt = 1
    keeper.verify()
    store.redis.delete(store.keys.lease(doc["id"]))  # lapsed while frozen
    keeper.verify()  # still ours: taken back
    assert JobState(store).lease_holder(doc["id"]) == "me/1"
    store.redis.delete(store.keys.lease(doc["id"]))
    store.finish(doc["id"], JobStatus.SUCCEEDED, output={})  # attempt 1 finished elsewhere
    with pytest.raises(LeaseLost):
        keeper.verify()
    assert JobState(store).lease_holder(doc["id"]) is None


def test_a_hand_back_requeues_without_counting_and_resends_at_once(fleet: Any) -> None:
    leaving, staying = fleet("leaving"), fleet("staying")
    doc = _doc()
    store = leaving.runner.store

    def sigterm(step: int, control: JobControl) -> None:
        control.hands_back = True  # a fine-tune's handler says so
        if step == 2:
            leaving.runner.ctx.draining.set()

    leaving.handler.on_step = sigterm
    assert leaving.runner.execute(doc, "t") is None
    record = store.get(doc["id"])
    # Not counted against max_attempts (requeued), but the next run is attempt 2.
    assert record is not None and record.status == "queued" and record.attempt == 1
    assert record.metrics["requeued"] == 1
    assert JobState(store).lease_holder(doc["id"]) is None
    assert [job["id"] for job in leaving.jobs] == [doc["id"]]
    # Watched for the re-send's grace: should the message's worker die before claiming
    # it, a sweeper sends it again (not the broker's visibility timeout).
    score = RunningSet(store).score(doc["id"])
    assert score is not None and score > time.time() + 30
    assert leaving.webhooks == []  # a hand-back is not an event: the job goes on
    done = staying.runner.execute(leaving.jobs[0], "t")
    assert done is not None and done.status == "succeeded" and done.attempt == 2


def test_a_hand_back_that_could_not_resend_is_resent_by_a_sweeper(fleet: Any) -> None:
    leaving, sweeper = fleet("leaving", failover_scan_s=0.0), fleet("sweeper")
    doc = _doc()

    def broker_down(document: Document) -> None:
        raise ConnectionError("broker away")

    leaving.runner.ctx.send_job = broker_down
    leaving.runner.ctx.draining.set()

    def fine_tune(step: int, control: JobControl) -> None:
        control.hands_back = True

    leaving.handler.on_step = fine_tune
    assert leaving.runner.execute(doc, "t") is None
    assert sweeper.sweeper.sweep() == [(doc["id"], "redispatch")]
    assert [job["id"] for job in sweeper.jobs] == [doc["id"]]


def test_transient_errors_retry_without_counting_then_fail_with_result_json(
    fleet: Any,
) -> None:
    worker = fleet("w")
    doc = _doc()
    store = worker.runner.store

    def storage_down(step: int, control: JobControl) -> None:
        raise TransientError("storage away")

    worker.handler.on_step = storage_down
    with pytest.raises(Deferred):
        worker.runner.execute(doc, "t")
    record = store.get(doc["id"])
    assert record is not None and record.status == "queued" and record.attempt == 1
    assert record.metrics["requeued"] == 1
    # Watched until the retry runs: a sweeper re-sends it if the retry's worker dies.
    score = RunningSet(store).score(doc["id"])
    assert score is not None
    record = worker.runner.execute(doc, "t")  # the retry; storage_retries=1 is spent
    assert record is not None and record.status == "failed" and record.attempt == 2
    # The tenant-facing message names an error id; the operator's detail says why.
    assert record.error is not None and record.error.code == "internal"
    error_id = record.error.message.rsplit(" ", 1)[-1].rstrip(")")
    detail = ErrorDetails(store).get(error_id)
    assert detail is not None and "gave up after 2 tries" in detail["message"]
    result = json.loads(worker.runner.ctx.storage.get(f"jobs/{doc['id']}/result.json"))
    assert result["status"] == "failed"
    assert RunningSet(store).score(doc["id"]) is None


def test_the_run_after_a_hand_back_sends_a_started_event_of_its_own(fleet: Any) -> None:
    """The attempt never goes back, so the webhooks worker does not drop the next run's
    ``job.started`` (or its progress) as a duplicate of the handed-back run's."""
    leaving, staying = fleet("leaving"), fleet("staying")
    doc = _doc()
    doc["webhook"]["events"] = ["job.started", "job.progress", "job.succeeded"]

    def sigterm(step: int, control: JobControl) -> None:
        control.hands_back = True
        if step == 2:
            leaving.runner.ctx.draining.set()

    leaving.handler.on_step = sigterm
    assert leaving.runner.execute(doc, "t") is None
    done = staying.runner.execute(leaving.jobs[0], "t")
    assert done is not None and done.status == "succeeded"
    sent = [e.webhook_id for e in leaving.webhooks + staying.webhooks]
    started = [i for i in sent if "_started_" in i]
    assert len(started) == 2 and len(set(sent)) == len(sent), sent


def test_max_attempts_counts_lost_workers_not_hand_backs(fleet: Any) -> None:
    worker = fleet("w", max_attempts=2)
    doc = _doc()
    store = worker.runner.store
    for _ in range(2):  # two deploys hand the job back
        worker.runner.ctx.draining.set()
        worker.handler.on_step = lambda step, control: setattr(control, "hands_back", True)
        assert worker.runner.execute(doc, "t") is None
    worker.runner.ctx.draining.clear()
    worker.handler.on_step = None
    # Then its third run's worker dies: one lost worker, under max_attempts=2.
    store.update(
        doc["id"], lambda r: r.model_copy(update={"status": JobStatus.RUNNING, "attempt": 3})
    )
    done = worker.runner.execute(doc, "t")
    assert done is not None and done.status == "succeeded", done
    assert done.attempt == 4 and done.metrics["requeued"] == 2


def _result(worker: Worker, job_id: str) -> dict[str, Any]:
    return dict(json.loads(worker.runner.ctx.storage.get(f"jobs/{job_id}/result.json")))


def test_a_stale_runs_result_json_written_after_the_job_ended_is_put_right(
    fleet: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run stalls between its lease check and its result.json write; meanwhile another
    run takes the job over and ends it. The stale write lands last, then is rewritten."""
    stale, live = fleet("stale"), fleet("live")
    doc = _doc()
    store = stale.runner.store
    storage = stale.runner.ctx.storage
    put = storage.put

    stalled: list[str] = []

    def stalled_put(key: str, data: bytes, content_type: str) -> str:
        if key.endswith("result.json") and not stalled:
            stalled.append(key)
            store.redis.delete(store.keys.lease(doc["id"]))  # lapsed while frozen
            done = live.runner.execute(doc, "t")
            assert done is not None and done.attempt == 2
        return put(key, data, content_type)

    monkeypatch.setattr(storage, "put", stalled_put)
    assert stale.runner.execute(doc, "t") is None
    record = store.get(doc["id"])
    assert record is not None and record.status == "succeeded" and record.worker == "live"
    assert _result(stale, doc["id"])["worker"] == "live"
    assert _result(stale, doc["id"]) == record.to_json()


def test_a_stale_runs_result_json_landing_before_the_final_record_is_rewritten(
    fleet: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stale run's write lands after the live run's result.json, before its final
    record: the stale run marks it, and the live run writes result.json again."""
    stale, live = fleet("stale"), fleet("live")
    doc = _doc()
    store = live.runner.store
    storage = live.runner.ctx.storage
    put = storage.put
    key = f"jobs/{doc['id']}/result.json"
    live.runner.ctx.storage.put(key, b"{}", "application/json")
    store.create(new_record(doc), doc)
    store.update(
        doc["id"], lambda r: r.model_copy(update={"status": JobStatus.RUNNING, "attempt": 1})
    )

    raced: list[str] = []

    def then_the_stale_write(name: str, data: bytes, content_type: str) -> str:
        uri = put(name, data, content_type)
        if name == key and not raced:
            raced.append(name)
            # The stale run (attempt 1) writes its own record, then finds attempt 2.
            stale_record = json.dumps({"id": doc["id"], "attempt": 1, "worker": "stale"})
            stale.runner.ctx.storage.put(key, stale_record.encode(), "application/json")
            stale.runner.transitions.mark_result_stale(doc["id"])
        return uri

    monkeypatch.setattr(storage, "put", then_the_stale_write)
    done = live.runner.execute(doc, "t")
    assert done is not None and done.attempt == 2 and done.worker == "live"
    assert _result(live, doc["id"]) == done.to_json()
    assert not store.redis.hexists(store.keys.once(doc["id"]), "result.json:stale")
    assert (
        RunningSet(store).score(doc["id"]) is None
        and JobState(store).lease_holder(doc["id"]) is None
    )


def test_checkpoint_writes_ask_redis_whether_the_run_still_holds_its_job(fleet: Any) -> None:
    worker = fleet("w")
    doc = _doc()
    store = worker.runner.store

    def taken_over(step: int, control: JobControl) -> None:
        control.hold()  # ours: passes
        store.redis.set(store.keys.lease(doc["id"]), "other/1")
        control.hold()

    worker.handler.on_step = taken_over
    assert worker.runner.execute(doc, "t") is None
    assert JobState(store).lease_holder(doc["id"]) == "other/1"
    assert not worker.runner.ctx.storage.exists(f"jobs/{doc['id']}/result.json")


#: The re-send grace of ``_grace_fleet``'s workers: lease_ttl_s + failover_scan_s. Their
#: lease outlives 14 missed beats of 0.1 s, so a loaded machine's pause is no lapse.
GRACE_S = 1.8


def _grace_fleet(fleet: Any, names: list[str]) -> list[Worker]:
    """Workers whose re-send grace is short (``GRACE_S``)."""
    return [fleet(n, lease_ttl_s=1.5, heartbeat_interval_s=0.1, failover_scan_s=0.3) for n in names]


def _sweep_until(worker: Worker, seconds: float) -> list[tuple[str, str]]:
    """Sweep every 50 ms for ``seconds``; what the passes acted on."""
    acted: list[tuple[str, str]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        acted += worker.sweeper.sweep()
        time.sleep(0.05)
    return acted


def test_the_shipped_resend_grace_outlasts_a_lease_and_backs_off_to_the_visibility_timeout() -> (
    None
):
    settings = Settings()
    first, most = resend_grace_s(settings)
    # A re-sent message's run claims within a lease's time and a scan; its claim then
    # scores the entry by its own lease, so a live run is never re-sent.
    assert first == settings.lease_ttl_s + settings.failover_scan_s == 35.0
    assert most == settings.visibility_timeout_s == 3600


def test_a_sweeper_that_dies_before_resending_leaves_the_job_to_another(fleet: Any) -> None:
    dying, other = _grace_fleet(fleet, ["dying", "other"])
    doc = _doc()
    _died_mid_run(dying, doc)

    def die(document: Document) -> None:
        raise SystemExit  # the sweeper's process dies between the inspect and the send

    dying.sweeper.send_job = die
    with pytest.raises(SystemExit):
        dying.sweeper.sweep()
    store = other.runner.store
    score = RunningSet(store).score(doc["id"])
    assert score is not None and score > time.time()  # still watched, not due yet
    assert other.sweeper.sweep() == []  # within the grace nobody re-sends it
    time.sleep(GRACE_S + 0.2)
    assert other.sweeper.sweep() == [(doc["id"], "redispatch")]
    assert [job["id"] for job in other.jobs] == [doc["id"]]
    record = other.runner.execute(other.jobs[0], "t")
    assert record is not None and record.status == "succeeded" and record.attempt == 2
    assert RunningSet(store).score(doc["id"]) is None


def test_a_resent_job_that_no_worker_claims_is_resent_again_and_twice_is_harmless(
    fleet: Any,
) -> None:
    (worker,) = _grace_fleet(fleet, ["w"])
    doc = _doc()
    _died_mid_run(worker, doc)
    # Re-sent at once; that message's worker dies before claiming it: re-sent again
    # after the grace, and a third time only after twice the grace more (it doubles).
    acted = _sweep_until(worker, 2 * GRACE_S)
    assert acted == [(doc["id"], "redispatch")] * 2
    assert [job["id"] for job in worker.jobs] == [doc["id"]] * 2
    first, second = worker.jobs
    record = worker.runner.execute(first, "t")
    assert record is not None and record.status == "succeeded" and record.attempt == 2
    assert worker.runner.execute(second, "t") is None  # the second copy: a no-op
    assert worker.handler.calls == 1
    assert [e.type for e in worker.webhooks] == ["job.succeeded"]
    assert RunningSet(worker.runner.store).score(doc["id"]) is None


def test_a_claimed_resend_is_not_resent_while_its_run_lives(fleet: Any) -> None:
    (worker,) = _grace_fleet(fleet, ["w"])
    doc = _doc()
    _died_mid_run(worker, doc)
    assert worker.sweeper.sweep() == [(doc["id"], "redispatch")]
    acted: list[tuple[str, str]] = []

    def slow(step: int, control: JobControl) -> None:
        if step == 1:  # the run outlives the grace; the heartbeat keeps its lease
            acted.extend(_sweep_until(worker, GRACE_S + 0.4))

    worker.handler.on_step = slow
    record = worker.runner.execute(worker.jobs[0], "t")
    assert record is not None and record.status == "succeeded"
    assert acted == [] and len(worker.jobs) == 1


def test_a_job_whose_document_expired_fails_as_worker_lost_instead_of_being_forgotten(
    fleet: Any,
) -> None:
    worker = fleet("w")
    doc = _doc()
    _died_mid_run(worker, doc)
    store = worker.runner.store
    store.redis.delete(store.keys.doc(doc["id"]))
    assert worker.sweeper.sweep() == [(doc["id"], "redispatch")]
    assert worker.jobs == []  # nothing to re-send
    record = store.get(doc["id"])
    assert record is not None and record.status == "failed"
    assert record.error is not None and record.error.code == "worker_lost"
    result = json.loads(worker.runner.ctx.storage.get(f"jobs/{doc['id']}/result.json"))
    assert result["error"]["code"] == "worker_lost"
    assert RunningSet(store).score(doc["id"]) is None


def test_a_job_whose_document_expired_stays_watched_while_it_cannot_be_ended(
    fleet: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = fleet("w")
    doc = _doc()
    _died_mid_run(worker, doc)
    store = worker.runner.store
    store.redis.delete(store.keys.doc(doc["id"]))
    storage = worker.runner.ctx.storage

    def down(key: str, data: bytes, content_type: str) -> str:
        raise TransientError("storage away")

    monkeypatch.setattr(storage, "put", down)
    assert worker.sweeper.sweep() == []
    record = store.get(doc["id"])
    assert record is not None and record.status == "running"
    assert RunningSet(store).score(doc["id"]) is not None  # a later pass tries again


def test_a_sweeper_that_dies_while_finalizing_leaves_it_to_another(fleet: Any) -> None:
    dying, other = _grace_fleet(fleet, ["dying", "other"])
    doc = _doc()
    store = dying.runner.store
    store.create(new_record(doc), doc)
    store.finish(doc["id"], JobStatus.SUCCEEDED, output={})
    RunningSet(store).watch(doc["id"], -1)

    def die(job_id: str) -> None:
        raise SystemExit

    dying.sweeper.finalize = die
    with pytest.raises(SystemExit):
        dying.sweeper.sweep()
    time.sleep(GRACE_S + 0.2)
    assert other.sweeper.sweep() == [(doc["id"], "finalize")]
    record = store.get(doc["id"])
    assert record is not None
    final_id = event_id(doc["id"], "job.succeeded", record.created_at)
    assert [e.webhook_id for e in other.webhooks] == [final_id]
    assert RunningSet(store).score(doc["id"]) is None
