"""Thin task adapters: decode the message, call the runtime, ask Celery to retry if told,
and end each job task as its job ended (tasks/outcome.py)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from celery import Celery, Task

from imageq.api_client.errors import ImageqError, InternalError, InvalidInput
from imageq.api_client.kinds import KINDS
from imageq.api_client.names import FINALIZE_TASK, WEBHOOK_TASK, task_name
from imageq.api_client.redact import redact_document
from imageq.tasks.outcome import JOB_TASK_OPTIONS, conclude, find_record
from imageq.tasks.state import WorkerState
from imageq.workers.runtime.lifecycle import Deferred
from imageq.workers.webhooks.post import WebhookEvent

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
        task_id = str(task.request.id)
        if len(args) != 1 or kwargs:
            runtime.runner.refuse(
                args[0] if args else {},
                task_id,
                InvalidInput(
                    "document: a job message carries exactly one argument, the job document; "
                    f"got {len(args)} positional and {len(kwargs)} keyword arguments"
                ),
            )
            store = runtime.ctx.store
            return conclude(
                task, runtime.runner.state, find_record(store, args[0] if args else {}, task_id)
            )
        job = args[0]
        try:
            try:
                record = runtime.runner.execute(job, fallback_id=str(task.request.id))
            except ImageqError as exc:
                # Storage or network trouble outside a run (a run handles its own): the
                # runner backs off (Deferred) a few times, then fails the job.
                if not exc.retryable:
                    raise
                job_id = job.get("id") if isinstance(job, dict) else None
                record = runtime.runner.retry_or_give_up(str(job_id or task.request.id), exc)
        except Deferred as deferred:
            raise _retry(task, job, deferred.countdown_s) from None
        # The task ends as its job did (tasks/outcome.py): FAILURE for a failed job,
        # REVOKED for a canceled one, so Flower and task events tell the truth.
        store = runtime.ctx.store
        counted = record is not None and runtime.runner.take_counted(record.id)
        found = record or find_record(store, job, task_id)
        return conclude(task, runtime.runner.state, found, counted=counted)

    return run


def _retry(task: Task, job: Any, countdown_s: float) -> Exception:
    # Celery does not carry argsrepr over to a retried message and would show (in
    # Flower, in task events) the raw document: inline images, webhook URL tokens.
    shown = json.dumps([redact_document(job)]) if isinstance(job, dict) else "[...]"
    return task.retry(countdown=countdown_s, argsrepr=shown)


def register_tasks(app: Celery, state: WorkerState) -> None:
    for kind in KINDS:
        app.task(name=task_name(kind), **TASK_OPTIONS, **JOB_TASK_OPTIONS)(_job_task(state))

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
