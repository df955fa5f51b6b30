"""A job's life on a worker: validate, claim, run once, record, store, notify.

At-least-once delivery becomes exactly-once effect here: the record says whether a job
already finished (then a redelivery only completes missing side effects), a lease keeps
two deliveries from running at once, and the attempt count bounds a job that keeps
killing its worker.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from api_client.errors import (
    Canceled,
    ImageqError,
    InternalError,
    InvalidInput,
    WorkerLost,
)
from api_client.records import Document, RecordStore, final_record, new_record, parse_time, utcnow
from api_client.schemas import JobDocument, JobRecord, JobStatus, WebhookSpec, parse_job
from api_client.settings import Settings
from api_client.webhooks import event_id
from workers.io.storage import Storage
from workers.runtime.control import JobControl, LeaseKeeper
from workers.webhooks.post import WebhookEvent

log = logging.getLogger(__name__)
_SAFE_ID = re.compile(r"[A-Za-z0-9-]{1,64}\Z")

#: A job's ``output`` document (kind-specific JSON) and one stored file's reference.
Output = dict[str, Any]


class Deferred(Exception):
    """Another live worker holds this job: look again after ``countdown_s``."""

    def __init__(self, countdown_s: float) -> None:
        super().__init__(f"job held by another worker; retry in {countdown_s} s")
        self.countdown_s = countdown_s


class Handler(Protocol):
    """Runs one kind of job; returns the ``output`` document.

    ``inp`` is ``job.input``, the kind's own model (``CaptionInput``...), validated once
    on receipt; handlers declare the model they serve.
    """

    def handle(self, job: JobDocument, inp: Any, control: JobControl) -> Output: ...


# What a worker kind's ``build(ctx, device)`` returns: its handlers and what to stop.
Built = tuple[dict[str, Handler], list[Callable[[], None]]]


@dataclass
class WorkerContext:
    settings: Settings
    store: RecordStore
    storage: Storage
    send_webhook: Callable[[WebhookEvent], None]
    worker_name: str
    model_id: str = ""

    def put_output(self, job_id: str, name: str, data: bytes, content_type: str) -> Output:
        """Store one output file beside result.json; S3 outputs carry a presigned URL."""
        key = f"jobs/{job_id}/{name}"
        ref: Output = {"uri": self.storage.put(key, data, content_type)}
        url = self.storage.public_url(key)
        if url:
            ref["url"] = url
        return ref


class JobRunner:
    def __init__(self, ctx: WorkerContext, handlers: dict[str, Handler]) -> None:
        self.ctx = ctx
        self.handlers = handlers
        self.settings = ctx.settings
        self.store = ctx.store

    # -- entry point ------------------------------------------------------------------
    def execute(self, raw: Any, fallback_id: str) -> JobRecord | None:
        """Run one delivery of a job message; returns the final record if it ended here."""
        job = self._accept(raw, fallback_id)
        if job is None:
            return None
        record = self.store.get(job.id)
        assert record is not None
        if record.is_final:
            # A redelivery of a finished job: only complete what a crash may have skipped.
            self.finalize(job.id)
            return None
        if self.store.cancel_requested(job.id):
            return self._end(job, Canceled("canceled before it started"))
        if job.kind not in self.handlers:
            return self._end(job, InvalidInput(f"kind: this worker does not serve {job.kind!r}"))
        token = f"{self.ctx.worker_name}/{uuid.uuid4().hex[:8]}"
        if not self.store.acquire_lease(job.id, token):
            wait = min(self.settings.lease_wait_s, self.settings.visibility_timeout_s / 2)
            raise Deferred(max(0.5, wait))
        with LeaseKeeper(self.store, job.id, token, self.settings.heartbeat_interval_s):
            return self._run(job)

    def _accept(self, raw: Any, fallback_id: str) -> JobDocument | None:
        """Validate the message; an invalid one fails with its own final record."""
        try:
            job = parse_job(raw)
        except InvalidInput as exc:
            self.refuse(raw, fallback_id, exc)
            return None
        document = job.wire()
        # A raw Celery message by task name has no record yet: create it now.
        self.store.create(new_record(document), document)
        if self.store.get_document(job.id) is None:
            self.store.save_document(job.id, document)
        return job

    def refuse(self, raw: Any, fallback_id: str, exc: InvalidInput) -> None:
        """Fail a message that is not a valid job, with a record of its own."""
        doc: Document = raw if isinstance(raw, dict) else {}
        # An id the schema refused may be a path ("../.."), and so may a raw message's
        # task id: neither may name a record or a storage key unless it is a valid id.
        job_id = next(
            (i for i in (doc.get("id"), fallback_id) if isinstance(i, str) and _SAFE_ID.match(i)),
            str(uuid.uuid5(uuid.NAMESPACE_URL, str(fallback_id))),
        )
        kind = doc.get("kind") if isinstance(doc.get("kind"), str) else "unknown"
        partial: Document = {"id": job_id, "kind": kind, "input": {}}
        metadata = doc.get("metadata")
        if isinstance(metadata, dict) and len(json.dumps(metadata, default=str)) <= 4096:
            partial["metadata"] = metadata
        try:
            spec = WebhookSpec.model_validate(doc.get("webhook"))
            partial["webhook"] = spec.model_dump(mode="json")
        except Exception:  # no usable webhook on an invalid job: nothing to notify
            pass
        self.store.create(new_record(partial), partial)
        log.warning("job %s refused: %s", job_id, exc.message)
        self._end(job_id, exc)

    # -- running ----------------------------------------------------------------------
    def _run(self, job: JobDocument) -> JobRecord | None:
        record, changed = self.store.update(job.id, self._start_mutation())
        if record is None or not changed:
            return None
        if record.status == JobStatus.FAILED:  # attempts exhausted by worker deaths
            self.finalize(job.id)
            return record
        self.emit(job.id, "job.started", record)
        control = JobControl(
            job.id,
            self.store,
            timeout_s=job.timeout_s,
            on_progress=lambda progress: self._progress_event(job.id, progress),
            progress_every_s=self.settings.progress_webhook_interval_s,
        )
        try:
            control.check()
            output = self.handlers[job.kind].handle(job, job.input, control)
        except ImageqError as exc:
            if exc.retryable:
                raise
            return self._end(job, exc, control.metrics)
        except Exception as exc:
            log.exception("job %s: unexpected error", job.id)
            return self._end(job, InternalError(f"{type(exc).__name__}: {exc}"), control.metrics)
        return self._end(job, None, control.metrics, output)

    def _start_mutation(self) -> Callable[[JobRecord], JobRecord | None]:
        settings, worker = self.settings, self.ctx.worker_name

        def mutate(rec: JobRecord) -> JobRecord | None:
            if rec.is_final:
                return None
            if rec.status == JobStatus.RUNNING and rec.attempt >= settings.max_attempts:
                lost = WorkerLost(
                    f"the worker running this job was lost {rec.attempt} times; giving up"
                )
                return final_record(rec, JobStatus.FAILED, error=lost)
            created = parse_time(rec.created_at)
            metrics = dict(rec.metrics)
            if created is not None and metrics.get("queue_s") is None:
                metrics["queue_s"] = round(time.time() - created, 4)
            rec.status = JobStatus.RUNNING
            rec.attempt += 1
            rec.worker = worker
            rec.model = self.ctx.model_id or None
            rec.started_at = utcnow()
            rec.metrics = metrics
            rec.progress = None
            return rec

        return mutate

    def _end(
        self,
        job: JobDocument | str,
        error: ImageqError | None,
        metrics: dict[str, Any] | None = None,
        output: Output | None = None,
    ) -> JobRecord | None:
        """Record the final status; result.json is written first, so a client that sees
        the final status can always read it."""
        job_id = job if isinstance(job, str) else job.id
        key = f"jobs/{job_id}/result.json"
        current = self.store.get(job_id)
        if current is None or current.is_final:
            self.finalize(job_id)
            return None
        current.result_uri = self.ctx.storage.uri(key)
        current.result_url = self.ctx.storage.public_url(key) or None
        if metrics:
            current.metrics = {**current.metrics, **metrics}
        if error is None:
            status = JobStatus.SUCCEEDED
        else:
            status = JobStatus.CANCELED if isinstance(error, Canceled) else JobStatus.FAILED
            log.info("job %s %s: %s", job_id, status, error)
        final = final_record(current, status, output=output, error=error)
        self.ctx.storage.put(key, _result_json(final), "application/json")
        record, changed = self.store.replace_unless_final(job_id, final)
        if changed:
            self.store.claim_once(job_id, "result.json")
        self.finalize(job_id)
        return record if changed else None

    # -- side effects, once -----------------------------------------------------------
    def finalize(self, job_id: str) -> None:
        """Write result.json and send the final event if a crash skipped them.

        Safe to call any number of times, from any worker.
        """
        record = self.store.get(job_id)
        if record is None or not record.is_final:
            return
        key = f"jobs/{job_id}/result.json"
        if not record.result_uri:
            uri = self.ctx.storage.uri(key)

            def mutate(rec: JobRecord) -> JobRecord | None:
                if rec.result_uri:
                    return None
                rec.result_uri = uri
                return rec

            record, _ = self.store.update(job_id, mutate)
            assert record is not None
        try:
            if not self.store.done_once(job_id, "result.json"):
                self.ctx.storage.put(key, _result_json(record), "application/json")
                self.store.claim_once(job_id, "result.json")
        finally:
            # Storage that stays down (the job failed for it) must not also swallow the
            # final event: the record in Redis is final either way.
            self.emit(job_id, "job." + record.status, record)

    def emit(self, job_id: str, event_type: str, record: JobRecord, seq: int = 0) -> None:
        document = self.store.get_document(job_id) or {}
        webhook = document.get("webhook")
        if not webhook or event_type not in webhook.get("events", ()):
            return
        final = record.is_final and event_type != "job.progress"
        if final and not self.store.claim_once(job_id, "webhook:" + event_type):
            return
        event = WebhookEvent(
            webhook_id=event_id(job_id, event_type, seq),
            url=webhook["url"],
            type=event_type,
            timestamp=utcnow(),
            data=record.to_json(),
        )
        try:
            self.ctx.send_webhook(event)
        except Exception:
            if final:  # let a later finalize() try again
                self.store.forget_once(job_id, "webhook:" + event_type)
            raise

    def _progress_event(self, job_id: str, progress: dict[str, Any]) -> None:
        record = self.store.get(job_id)
        if record is not None:
            self.emit(job_id, "job.progress", record, seq=int(progress.get("step", 0)))

    def fail(self, job_id: str, error: ImageqError) -> None:
        """Give up on a job from outside its run (e.g. retries of a transient error spent)."""
        self.store.finish(job_id, JobStatus.FAILED, error=error)
        self.finalize(job_id)


def _result_json(record: JobRecord) -> bytes:
    return json.dumps(record.to_json(), indent=2).encode()
