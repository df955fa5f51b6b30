"""A job's final status becomes its Celery task's state (tasks/outcome.py), without
Celery's worker: a fake task and a fake once-store stand in."""

from __future__ import annotations

import pickle
from types import SimpleNamespace
from typing import Any, cast

import pytest
from celery import Task
from celery.exceptions import Ignore, Retry
from celery.worker.request import Request

from imageq.api_client.errors import ERROR_CODES
from imageq.api_client.records import RecordStore
from imageq.api_client.schemas import ErrorRecord, JobRecord, JobStatus
from imageq.tasks import outcome
from imageq.tasks.outcome import JobFailed, JobRequest, conclude, counted, find_record


class FakeStore:
    def __init__(self, records: dict[str, JobRecord] | None = None) -> None:
        self.records = records or {}
        self.claims: set[tuple[str, str]] = set()

    def claim_once(self, job_id: str, what: str) -> bool:
        if (job_id, what) in self.claims:
            return False
        self.claims.add((job_id, what))
        return True

    def get(self, job_id: str) -> JobRecord | None:
        return self.records.get(job_id)


class FakeTask:
    def __init__(self) -> None:
        self.request = SimpleNamespace(id="task-1", hostname="caption@test")
        self.events: list[tuple[str, dict[str, Any]]] = []

    def send_event(self, type_: str, **fields: Any) -> None:
        self.events.append((type_, fields))


def record(status: JobStatus, code: str | None = None, message: str = "") -> JobRecord:
    error = None if code is None else ErrorRecord(code=code, message=message)
    return JobRecord(
        id="job-1",
        kind="caption",
        status=status,
        error=error,
        created_at="2026-01-01T00:00:00Z",
        metrics={"queue_s": 0.01, "run_s": 0.2},
    )


def run(rec: JobRecord | None, store: FakeStore | None = None) -> tuple[Any, FakeTask]:
    task = FakeTask()
    result = conclude(cast(Task, task), cast(RecordStore, store or FakeStore()), rec)
    return result, task


def test_succeeded_returns_the_summary_and_counts_once() -> None:
    store = FakeStore()
    rec = record(JobStatus.SUCCEEDED)
    result, task = run(rec, store)
    assert result == {"kind": "caption", "status": "succeeded", "metrics": rec.metrics}
    assert counted(task) is rec and not task.events
    # A redelivery of the finished job reports the same, but the job is counted once.
    again, task2 = run(rec, store)
    assert again == result and counted(task2) is None


def test_failed_raises_an_exception_named_after_its_code() -> None:
    rec = record(JobStatus.FAILED, "invalid_input", "image is 400x300 pixels, over 40000")
    with pytest.raises(JobFailed) as caught:
        run(rec)
    exc = caught.value
    assert type(exc).__name__ == "InvalidInput" and exc.code == "invalid_input"
    assert repr(exc) == "InvalidInput('invalid_input: image is 400x300 pixels, over 40000')"
    assert exc.message == "image is 400x300 pixels, over 40000"
    # Events carry repr(); should anything pickle it, it comes back the same.
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and back.args == exc.args


def test_failed_is_counted_by_the_delivery_that_concludes_it() -> None:
    task = FakeTask()
    store = FakeStore()
    rec = record(JobStatus.FAILED, "forbidden_url", "metadata address")
    with pytest.raises(JobFailed, match="forbidden_url: metadata address"):
        conclude(cast(Task, task), cast(RecordStore, store), rec)
    assert counted(task) is rec


# A job's error codes (docs/design.md §4); ERROR_CODES also lists submit-only codes.
JOB_ERROR_CODES = (
    "invalid_input",
    "input_fetch_failed",
    "forbidden_url",
    "model_error",
    "out_of_memory",
    "timeout",
    "worker_lost",
    "canceled",
    "internal",
)


def test_every_job_error_code_has_its_type() -> None:
    assert set(JOB_ERROR_CODES) <= set(ERROR_CODES)
    names = set()
    for code in JOB_ERROR_CODES:
        exc = JobFailed.of(code, "m")
        assert exc.code == code and str(exc) == f"{code}: m"
        # Module-level names: what pickle looks up.
        assert getattr(outcome, type(exc).__name__) is type(exc)
        names.add(type(exc).__name__)
    assert len(names) == len(JOB_ERROR_CODES)
    # A code without a type of its own keeps its name in the message.
    assert type(JobFailed.of("no_such_code", "m")).__name__ == "InternalError"
    assert str(JobFailed.of("no_such_code", "m")) == "no_such_code: m"


def test_canceled_is_revoked_not_failed() -> None:
    rec = record(JobStatus.CANCELED, "canceled", "canceled before it started")
    with pytest.raises(Ignore):
        run(rec)
    task = FakeTask()
    with pytest.raises(Ignore):
        conclude(cast(Task, task), cast(RecordStore, FakeStore()), rec)
    assert [t for t, _ in task.events] == ["task-revoked"]
    fields = task.events[0][1]
    assert fields["terminated"] is False and fields["expired"] is False
    assert fields["exception"] == "Canceled('canceled: canceled before it started')"
    assert counted(task) is rec


def test_canceled_without_events_still_ends_quietly() -> None:
    class Deaf(FakeTask):
        def send_event(self, type_: str, **fields: Any) -> None:
            raise ConnectionError("broker away")

    task = Deaf()
    with pytest.raises(Ignore):
        conclude(
            cast(Task, task),
            cast(RecordStore, FakeStore()),
            record(JobStatus.CANCELED, "canceled", "x"),
        )


@pytest.mark.parametrize("status", [JobStatus.QUEUED, JobStatus.RUNNING])
def test_a_job_that_runs_again_elsewhere_is_a_retry(status: JobStatus) -> None:
    task = FakeTask()
    with pytest.raises(Retry):
        conclude(cast(Task, task), cast(RecordStore, FakeStore()), record(status))
    assert counted(task) is None and not task.events


def test_no_record_at_all_reports_nothing() -> None:
    result, task = run(None)
    assert result is None and counted(task) is None


def test_find_record_follows_the_runner_ids() -> None:
    import uuid

    kept = record(JobStatus.FAILED, "invalid_input", "x")
    by_doc = FakeStore({"doc-id": kept})
    assert find_record(cast(RecordStore, by_doc), {"id": "doc-id"}, "task-id") is kept
    by_task = FakeStore({"task-id": kept})
    assert find_record(cast(RecordStore, by_task), {"id": "../.."}, "task-id") is kept
    assert find_record(cast(RecordStore, by_task), "not a dict", "task-id") is kept
    mapped = str(uuid.uuid5(uuid.NAMESPACE_URL, "bad/task id"))
    by_uuid5 = FakeStore({mapped: kept})
    assert find_record(cast(RecordStore, by_uuid5), {}, "bad/task id") is kept
    assert find_record(cast(RecordStore, FakeStore()), {}, "nothing") is None


def test_expected_failures_reach_events_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(Request, "on_failure", lambda self, info, *a: seen.append(info.traceback))
    request = JobRequest.__new__(JobRequest)
    from billiard.einfo import ExceptionInfo

    def einfo(exc: Exception) -> ExceptionInfo:
        try:
            raise exc
        except Exception:
            return ExceptionInfo()

    request.on_failure(einfo(JobFailed.of("invalid_input", "too big")))
    request.on_failure(einfo(RuntimeError("a real bug")))
    assert seen[0] is None
    assert "RuntimeError: a real bug" in seen[1]
