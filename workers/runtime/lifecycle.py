"""A job's life on a worker: validate, claim, run once, record, store, notify.

At-least-once delivery becomes exactly-once effect here: the record says whether a job
already finished (then a redelivery only completes missing side effects), a lease keeps
two deliveries from running at once, and the attempt count bounds a job that keeps
killing its worker. A run keeps its job in the running set while it holds the lease, so
that a sweeper re-sends the job within seconds when its worker dies (``failover``).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
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
from api_client.webhooks import event_id, progress_key
from workers.io.storage import Storage
from workers.runtime.control import HandedBack, JobControl, LeaseKeeper, LeaseLost, RunInterrupted
from workers.runtime.failover import RunningSet, SendJob, back_to_queued, hand_back
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
    #: Re-sends a job document to its queue (hand-back, failover); None: nowhere to send.
    send_job: SendJob | None = None
    #: Set once the worker shuts down (SIGTERM): jobs that can resume elsewhere stop.
    draining: threading.Event = field(default_factory=threading.Event)
    #: The leases of the jobs running here, by job id.
    leases: dict[str, LeaseKeeper] = field(default_factory=dict)

    def put_output(self, job_id: str, name: str, data: bytes, content_type: str) -> Output:
        """Store one output file beside result.json; S3 outputs carry a presigned URL.

        Only while this worker holds the job's lease: a run that lost it (it stalled,
        another worker runs the job now) must not overwrite the other run's outputs.
        """
        lease = self.leases.get(job_id)
        if lease is not None:
            lease.verify()
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
        self.running = RunningSet(ctx.store)

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
        lease = LeaseKeeper(
            self.store, job.id, token, self.settings.heartbeat_interval_s, self.running
        )
        self.ctx.leases[job.id] = lease
        try:
            with lease:
                return self._own_run(job, lease)
        finally:
            self.ctx.leases.pop(job.id, None)

    def _own_run(self, job: JobDocument, lease: LeaseKeeper) -> JobRecord | None:
        """Run holding the lease; the job leaves the running set only once it is done."""
        try:
            record = self._run(job, lease)
        except LeaseLost:
            # Nothing recorded, nothing stored: the holder owns the job and its record.
            log.warning("job %s: attempt %s abandoned to the lease holder", job.id, lease.attempt)
            return None
        except HandedBack as exc:
            document = self.store.get_document(job.id) or job.wire()
            hand_back(self.running, document, lease.attempt, lease.release, self.ctx.send_job)
            log.warning("job %s: handed back: %s", job.id, exc.message)
            return None
        except ImageqError as exc:
            if not exc.retryable:
                raise
            return self.retry_or_give_up(job.id, exc, lease)
        lease.stop_renewing()
        self.running.forget(job.id)
        return record

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
    def _run(self, job: JobDocument, lease: LeaseKeeper) -> JobRecord | None:
        lost_runs: list[int] = []
        record, changed = self.store.update(job.id, self._start_mutation(lost_runs))
        if lost_runs:  # attempts exhausted by worker deaths: end it, result.json first
            lost = WorkerLost(f"the worker running this job was lost {lost_runs[0]} times")
            log.warning("job %s: %s; giving up", job.id, lost.message)
            return self._end(job, lost, lease=lease)
        if record is None or not changed:
            return None
        lease.attempt = record.attempt
        if record.attempt > 1:
            log.info("job %s: attempt %d on %s", job.id, record.attempt, self.ctx.worker_name)
        self.emit(job.id, "job.started", record, key=f"a{record.attempt}")
        control = JobControl(
            job.id,
            self.store,
            timeout_s=job.timeout_s,
            on_progress=lambda progress: self._progress_event(job.id, progress),
            progress_every_s=self.settings.progress_webhook_interval_s,
            lease=lease,
            draining=self.ctx.draining,
        )
        try:
            control.check()
            output = self.handlers[job.kind].handle(job, job.input, control)
        except RunInterrupted:
            raise
        except ImageqError as exc:
            if exc.retryable:
                raise
            return self._end(job, exc, control.metrics, lease=lease)
        except Exception as exc:
            log.exception("job %s: unexpected error", job.id)
            error = InternalError(f"{type(exc).__name__}: {exc}")
            return self._end(job, error, control.metrics, lease=lease)
        return self._end(job, None, control.metrics, output, lease=lease)

    def _start_mutation(self, lost_runs: list[int]) -> Callable[[JobRecord], JobRecord | None]:
        settings, worker = self.settings, self.ctx.worker_name

        def mutate(rec: JobRecord) -> JobRecord | None:
            lost_runs.clear()
            if rec.is_final:
                return None
            if rec.status == JobStatus.RUNNING and rec.attempt >= settings.max_attempts:
                lost_runs.append(rec.attempt)
                return None
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
        *,
        lease: LeaseKeeper | None = None,
        best_effort: bool = False,
    ) -> JobRecord | None:
        """Record the final status; result.json is written first, so a client that sees
        the final status can always read it.

        With ``lease``, only while this run still holds it, and only over this run's
        own attempt. ``best_effort``: storage is down for good (the job fails for it);
        the final status is recorded without result.json rather than never.
        """
        job_id = job if isinstance(job, str) else job.id
        key = f"jobs/{job_id}/result.json"
        current = self.store.get(job_id)
        if current is None or current.is_final:
            self.finalize(job_id)
            return None
        attempt = None if lease is None else lease.attempt
        if lease is not None:
            lease.verify()
            if attempt is not None and current.attempt != attempt:
                raise LeaseLost(f"job {job_id}: attempt {current.attempt} runs elsewhere")
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
        try:
            self.ctx.storage.put(key, _result_json(final), "application/json")
            wrote = True
        except ImageqError as exc:
            if not best_effort:
                raise
            log.warning("job %s: result.json not written: %s", job_id, exc.message)
            wrote = False

        def mutate(rec: JobRecord) -> JobRecord | None:
            if rec.is_final or (attempt is not None and rec.attempt != attempt):
                return None
            return final

        record, changed = self.store.update(job_id, mutate)
        if not changed and record is not None and not record.is_final:
            raise LeaseLost(f"job {job_id}: attempt {record.attempt} runs elsewhere")
        if changed and wrote:
            self.store.claim_once(job_id, "result.json")
        self.finalize(job_id)
        return record if changed else None

    def retry_or_give_up(
        self, job_id: str, exc: ImageqError, lease: LeaseKeeper | None = None
    ) -> JobRecord | None:
        """Storage or network trouble: ``Deferred`` with a backoff a few times, then fail
        the job (``internal``, "gave up after ...")."""
        settings = self.settings
        counter = self.store.key("transient", job_id)
        tries = int(self.store.redis.incr(counter))
        self.store.redis.expire(counter, settings.result_ttl_s)
        if tries > settings.storage_retries:
            error = InternalError(f"gave up after {tries} tries: {exc.message}")
            try:
                record = self._end(job_id, error, lease=lease, best_effort=True)
            except LeaseLost:
                log.warning("job %s: attempt abandoned to the lease holder", job_id)
                return None
            except ImageqError as still_down:
                # The record and the final event are out; only result.json waits.
                log.warning("job %s failed; result.json not written: %s", job_id, still_down)
                record = None
            if lease is not None:
                lease.stop_renewing()
                self.running.forget(job_id)
            return record
        delay = settings.storage_retry_base_s * 2**tries
        log.warning("job %s: %s; retry %d in %.1f s", job_id, exc.message, tries, delay)
        if lease is not None:
            # The try that hit a transient error does not count as a lost worker. Should
            # the worker holding the retry die, a sweeper re-sends the job after this.
            lease.stop_renewing()
            self.store.update(job_id, back_to_queued(lease.attempt))
            look_in = delay + settings.lease_ttl_s + settings.failover_scan_s
            self.running.watch(job_id, look_in)
        raise Deferred(delay)

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

    def emit(self, job_id: str, event_type: str, record: JobRecord, key: str = "") -> None:
        document = self.store.get_document(job_id) or {}
        webhook = document.get("webhook")
        if not webhook or event_type not in webhook.get("events", ()):
            return
        final = record.is_final and event_type != "job.progress"
        done = "webhook:" + event_type
        if final and self.store.done_once(job_id, done):
            return
        event = WebhookEvent(
            webhook_id=event_id(job_id, event_type, key),
            url=webhook["url"],
            type=event_type,
            timestamp=utcnow(),
            data=record.to_json(),
        )
        # Sent first, marked done after: a crash between the two sends it again from a
        # later finalize (sweeper, redelivery) with the same webhook-id, and the webhooks
        # worker delivers one webhook-id once. Marked first, a crash would lose it.
        self.ctx.send_webhook(event)
        if final:
            self.store.claim_once(job_id, done)

    def _progress_event(self, job_id: str, progress: dict[str, Any]) -> None:
        record = self.store.get(job_id)
        if record is not None:
            key = progress_key(record.attempt, progress)
            self.emit(job_id, "job.progress", record, key=key)


def _result_json(record: JobRecord) -> bytes:
    return json.dumps(record.to_json(), indent=2).encode()
