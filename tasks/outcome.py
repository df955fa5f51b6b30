"""A job's final status as its Celery task's state, so that Flower shows the truth.

Celery learns how a task ended from what the task function does, and tells Flower (and
anything else that reads task events) in one event:

=============  ==============================================  ==================
job status     what the task does                              task state, event
=============  ==============================================  ==================
``succeeded``  returns ``{"kind", "status", "metrics"}``        SUCCESS, task-succeeded
``failed``     raises ``JobFailed`` (``InvalidInput(...)``...)  FAILURE, task-failed
``canceled``   sends ``task-revoked`` and raises ``Ignore``     REVOKED, task-revoked
not final      raises ``Retry`` (nothing is re-sent)            RETRY, task-retried
=============  ==============================================  ==================

"Not final" is a delivery that let go of its job (handed back at a shutdown, or a
stalled run that lost its lease): another delivery of the same task id ends it, and
its events then set the task's state.

None of this changes delivery. The record, ``result.json`` and webhooks are written by
the runtime before the task decides how to end; every outcome acknowledges the message
(``task_acks_on_failure_or_timeout`` for FAILURE, ``Ignore`` and ``Retry`` ack as
well); nothing autoretries (no ``autoretry_for``; ``Retry`` raised by hand re-sends
nothing). Expected failures log one INFO line without a traceback (``Task.throws``) and
reach events without one (``JobRequest``). Exceptions cross processes as ``repr``
strings in events, never as pickles (the result backend is off).

A job counts once: the delivery that first sees its final record claims it
(``claim_once(id, "counted")``) and leaves the record on the task's request for the
``task_postrun`` receiver (tasks/signals.py), which feeds Prometheus and the live
worker registry. A redelivery of a finished job reports the same state again but is not
counted twice.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, ClassVar

from celery import Task
from celery.exceptions import Ignore, Retry
from celery.worker.request import Request

from imageq.api_client.errors import ERRORS_BY_CODE
from imageq.api_client.records import RecordStore
from imageq.api_client.schemas import JobRecord, JobStatus
from imageq.workers.runtime.jobstate import JobState

log = logging.getLogger(__name__)

#: The attribute of a task's request that carries the record counted by this delivery.
_COUNTED = "imageq_counted"


class JobFailed(Exception):
    """A job that ended ``failed``: its task ends FAILURE.

    One subclass per error code, named after it (``InvalidInput``, ``ForbiddenUrl``, ...),
    with the message ``"<code>: <message>"``, so the event's ``exception`` field reads
    ``InvalidInput('invalid_input: image is 8000x8000 pixels ...')``.
    """

    code: ClassVar[str] = "internal"

    @property
    def message(self) -> str:
        return str(self.args[0]).split(": ", 1)[-1] if self.args else ""

    @staticmethod
    def of(code: str, message: str) -> JobFailed:
        cls = _FAILURES.get(code, Internal)
        return cls(f"{code}: {message}")


# One exception type per error code, named like api_client's (``InvalidInput``,
# ``ForbiddenUrl``...), made from that one hierarchy: Flower shows the type's name.
_FAILURES: dict[str, type[JobFailed]] = {
    code: type(error.__name__, (JobFailed,), {"code": code, "__module__": __name__})
    for code, error in ERRORS_BY_CODE.items()
}
Internal = _FAILURES["internal"]
# Module attributes too, so each type is found by its qualified name (Celery may pickle
# an exception to check it is safe to report, even with the result backend off).
globals().update({cls.__name__: cls for cls in _FAILURES.values()})


class JobRequest(Request):
    """The worker-side request of a job task: an expected failure's ``task-failed``
    event carries no traceback (the exception says what happened; the worker's log
    has the runtime's own traceback when there was an unexpected error)."""

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        if isinstance(exc, JobFailed):
            exc_info.traceback = None
        return super().on_failure(exc_info, send_failed_event, return_ok)


#: Options of the job tasks, beside tasks.jobs.TASK_OPTIONS.
JOB_TASK_OPTIONS: dict[str, Any] = {"throws": (JobFailed,), "Request": JobRequest}


def find_record(store: RecordStore, raw: Any, task_id: str) -> JobRecord | None:
    """The record the runner kept for this message: under the document's id, else the
    task id, else the id an unusable task id maps to (``JobRunner.refuse``)."""
    doc_id = raw.get("id") if isinstance(raw, dict) else None
    candidates = [doc_id] if isinstance(doc_id, str) and doc_id else []
    candidates += [task_id, str(uuid.uuid5(uuid.NAMESPACE_URL, task_id))]
    for candidate in candidates:
        record = store.get(candidate)
        if record is not None:
            return record
    return None


def conclude(
    task: Task, state: JobState, record: JobRecord | None, *, counted: bool = False
) -> dict[str, Any] | None:
    """End the task as its job ended (table above); ``record`` is the job's record now.

    ``counted``: the runner claimed the count already, with the final record it wrote.
    """
    if record is None:
        return None  # nothing to report on (no record was ever made)
    if not record.is_final:
        raise Retry(
            f"job {record.id} is {record.status} again: another delivery runs it",
            exc=None,
        )
    if counted or state.claim_once(record.id, "counted"):
        setattr(task.request, _COUNTED, record)
    if record.status == JobStatus.SUCCEEDED:
        return {"kind": record.kind, "status": str(record.status), "metrics": record.metrics}
    error = record.error
    code = error.code if error is not None else "internal"
    message = error.message if error is not None else "failed without an error record"
    if record.status == JobStatus.CANCELED:
        # Celery's own REVOKED: grey, not red, in Flower; and no task-succeeded after it.
        try:
            task.send_event(
                "task-revoked",
                terminated=False,
                signum=None,
                expired=False,
                exception=repr(JobFailed.of("canceled", message)),
            )
        except Exception as exc:  # the job is canceled either way; only Flower misses it
            log.warning("job %s: task-revoked event not sent: %s", record.id, exc)
        raise Ignore(f"job {record.id} canceled")
    raise JobFailed.of(code, message)


def counted(task: Any) -> JobRecord | None:
    """The record this task's delivery counted (for the ``task_postrun`` receiver)."""
    request = getattr(task, "request", None)
    record = getattr(request, _COUNTED, None)
    return record if isinstance(record, JobRecord) else None
