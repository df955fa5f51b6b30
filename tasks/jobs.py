"""Thin task adapters: decode the message, call the runtime, ask Celery to retry if told."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from celery import Celery, Task

from api_client.errors import ImageqError, InternalError, InvalidInput
from api_client.kinds import KINDS
from api_client.names import FINALIZE_TASK, WEBHOOK_TASK, task_name
from api_client.redact import redact_document
from api_client.schemas import JobRecord, JobStatus
from tasks.state import WorkerState
from workers.runtime.lifecycle import Deferred
from workers.webhooks.post import WebhookEvent

log = logging.getLogger(__name__)

TASK_OPTIONS: dict[str, Any] = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "max_retries": None,
    "ignore_result": True,
}


def _job_task(state: WorkerState) -> Callable[..., dict[str, Any] | None]:
    def run(task: Task, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        # A raw message may carry any arguments; anything but one document is invalid
        # input with a record of its own, never a crash in Celery's argument check.
        runtime = state.require()
        if len(args) != 1 or kwargs:
            runtime.runner.refuse(
                args[0] if args else {},
                str(task.request.id),
                InvalidInput(
                    "document: a job message carries exactly one argument, the job document; "
                    f"got {len(args)} positional and {len(kwargs)} keyword arguments"
                ),
            )
            return None
        job = args[0]
        try:
            record = runtime.runner.execute(job, fallback_id=str(task.request.id))
        except Deferred as deferred:
            raise _retry(task, job, deferred.countdown_s) from None
        except ImageqError as exc:
            if not exc.retryable:
                raise
            return _retry_transient(task, state, job, exc)
        if record is None:
            return None
        return {"kind": record.kind, "status": str(record.status), "metrics": record.metrics}

    return run


def _retry(task: Task, job: Any, countdown_s: float) -> Exception:
    # Celery does not carry argsrepr over to a retried message and would show (in
    # Flower, in task events) the raw document: inline images, webhook URL tokens.
    shown = json.dumps([redact_document(job)]) if isinstance(job, dict) else "[...]"
    return task.retry(countdown=countdown_s, argsrepr=shown)


def _retry_transient(
    task: Task, state: WorkerState, job: Any, exc: ImageqError
) -> dict[str, Any] | None:
    """Storage or network trouble: back off and retry a few times, then fail cleanly."""
    settings = state.settings
    job_id = job.get("id") if isinstance(job, dict) else None
    runtime = state.require()
    store = runtime.ctx.store
    tries = int(store.redis.incr(store.key("transient", str(job_id))))
    store.redis.expire(store.key("transient", str(job_id)), settings.result_ttl_s)
    if tries <= settings.storage_retries:
        delay = settings.storage_retry_base_s * 2**tries
        log.warning("job %s: %s; retry %d in %.1f s", job_id, exc.message, tries, delay)
        # The lease was released on the way out, so the retry may run anywhere.
        store.update(str(job_id), _back_to_queued)
        raise _retry(task, job, delay) from None
    try:
        runtime.runner.fail(
            str(job_id), InternalError(f"gave up after {tries} tries: {exc.message}")
        )
    except ImageqError as still_down:
        # The record and the final event are out; only result.json waits for storage.
        log.warning("job %s failed; result.json not written: %s", job_id, still_down.message)
    return {"kind": job.get("kind"), "status": "failed"} if isinstance(job, dict) else None


def _back_to_queued(record: JobRecord) -> JobRecord | None:
    if record.status != JobStatus.RUNNING:
        return None
    record.status = JobStatus.QUEUED
    # The try that hit a transient error does not count as a lost worker.
    record.attempt = max(0, record.attempt - 1)
    return record


def register_tasks(app: Celery, state: WorkerState) -> None:
    for kind in KINDS:
        app.task(name=task_name(kind), **TASK_OPTIONS)(_job_task(state))

    @app.task(name=WEBHOOK_TASK, **TASK_OPTIONS)
    def deliver_webhook(task: Task, event: dict[str, Any]) -> str:
        runtime = state.require()
        dispatcher = runtime.dispatcher
        if dispatcher is None:
            raise InternalError("this worker does not deliver webhooks")
        return dispatcher.handle(WebhookEvent.from_dict(event))

    @app.task(name=FINALIZE_TASK, **TASK_OPTIONS)
    def finalize(task: Task, job_id: str) -> None:
        state.require().runner.finalize(str(job_id))
