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
import time
import uuid
from collections.abc import Callable
from typing import Any

from imageq.api_client.error_details import ErrorDetails
from imageq.api_client.errors import Canceled, ImageqError, InvalidInput, WorkerLost
from imageq.api_client.records import Document, new_record, parse_time, utcnow
from imageq.api_client.references import GrantReader
from imageq.api_client.schemas import JobDocument, JobRecord, JobStatus, WebhookSpec, parse_job
from imageq.api_client.tenant_caps import PriorityCaps
from imageq.workers.runtime.context import Built, Deferred, Handler, Output, WorkerContext
from imageq.workers.runtime.control import (
    HandedBack,
    JobControl,
    LeaseKeeper,
    LeaseLost,
    RunInterrupted,
)
from imageq.workers.runtime.ending import RunEnding
from imageq.workers.runtime.failover import RunningSet, hand_back, runs_lost
from imageq.workers.runtime.jobstate import JobState
from imageq.workers.runtime.leases import Heart
from imageq.workers.runtime.transitions import Claimed, ClaimState, RunRecord, Transitions, Written

# The types handlers and builders use live in ``context``; they are imported from here.
__all__ = ["Built", "Deferred", "Handler", "JobRunner", "Output", "WorkerContext"]

log = logging.getLogger(__name__)
_SAFE_ID = re.compile(r"[A-Za-z0-9-]{1,64}\Z")


class JobRunner(RunEnding):
    def __init__(self, ctx: WorkerContext, handlers: dict[str, Handler]) -> None:
        self.ctx = ctx
        self.handlers = handlers
        self.settings = ctx.settings
        self.store = ctx.store
        self.state = JobState(ctx.store)
        self.running = RunningSet(ctx.store)
        # One round trip per state transition (transitions), one thread for every
        # running job's lease and the cancel set (leases).
        self.transitions = Transitions(ctx.store)
        self.heart = Heart(ctx.store, self.settings.heartbeat_interval_s)
        # A tenant's grants, read once per tenant job (remembered as long as a token).
        self.grants = GrantReader(ctx.store, self.settings.gateway_token_cache_s)
        #: Jobs whose count this runner claimed when it ended them (``take_counted``).
        self.counted: set[str] = set()
        # A tenant's job sent around the gateway (a Client naming the tenant, a raw
        # message) is held to the tenant's priority cap here: one cached read per tenant.
        self.caps = PriorityCaps(ctx.store.redis, ctx.store)

    def take_counted(self, job_id: str) -> bool:
        """Whether this runner ended ``job_id`` and claimed its count (once per job in the
        fleet: tasks/outcome.py); asked once, by the task that ran it."""
        if job_id in self.counted:
            self.counted.discard(job_id)
            return True
        return False

    def close(self) -> None:
        self.heart.stop()

    # -- entry point ------------------------------------------------------------------
    def execute(self, raw: Any, fallback_id: str) -> JobRecord | None:
        """Run one delivery of a job message; returns the final record if it ended here."""
        try:
            job = parse_job(raw)
        except InvalidInput as exc:
            self.refuse(raw, fallback_id, exc)
            return None
        # Its cancel is followed from before the claim reads the cancel key.
        self.heart.watch(job.id)
        try:
            return self._claim(job)
        finally:
            self.heart.unwatch(job.id)

    def _claim(self, job: JobDocument) -> JobRecord | None:
        document = job.wire()
        token = f"{self.ctx.worker_name}/{uuid.uuid4().hex[:8]}"
        over = self.caps.over(job.tenant, job.priority)
        # One script: the record created if a raw Celery message by task name brought
        # none; a final, canceled or unserved job refused; else the lease taken.
        claimed = self.transitions.claim(
            lambda: new_record(document),
            document,
            token,
            served=job.kind in self.handlers and over is None,
        )
        if claimed.state is ClaimState.FINAL:
            # A redelivery of a finished job: only complete what a crash may have skipped.
            self.finalize(job.id)
            return None
        if claimed.state is ClaimState.CANCELED:
            return self._end(job, Canceled("canceled before it started"))
        if claimed.state is ClaimState.UNSERVED and over is not None:
            # Already queued, so not refused at the door: failed, with its final record,
            # as any invalid job is (a clamped priority would run it as it did not ask).
            return self._end(
                job,
                InvalidInput(
                    f"priority: {job.priority} is over tenant {job.tenant!r}'s maximum of {over}"
                ),
            )
        if claimed.state is ClaimState.UNSERVED:
            return self._end(job, InvalidInput(f"kind: this worker does not serve {job.kind!r}"))
        if claimed.state is not ClaimState.LEASED:
            wait = min(self.settings.lease_wait_s, self.settings.visibility_timeout_s / 2)
            raise Deferred(max(0.5, wait))
        lease = LeaseKeeper(
            self.store,
            job.id,
            token,
            self.settings.heartbeat_interval_s,
            self.running,
            heart=self.heart,
            watched=True,
        )
        self.ctx.leases[job.id] = lease
        try:
            with lease:
                return self._own_run(job, lease, claimed)
        finally:
            self.ctx.leases.pop(job.id, None)

    def _own_run(self, job: JobDocument, lease: LeaseKeeper, claimed: Claimed) -> JobRecord | None:
        """Run holding the lease; the job leaves the running set only once it is done."""
        run = RunRecord(claimed.record, claimed.document, lease.token)
        try:
            record = self._run(job, lease, run, claimed.raw)
        except LeaseLost:
            # Nothing recorded, nothing stored: the holder owns the job and its record.
            log.warning("job %s: attempt %s abandoned to the lease holder", job.id, lease.attempt)
            return None
        except HandedBack as exc:
            hand_back(self.running, run.document, lease.attempt, lease.release, self.ctx.send_job)
            log.warning("job %s: handed back: %s", job.id, exc.message)
            return None
        except ImageqError as exc:
            if not exc.retryable:
                raise
            return self.retry_or_give_up(job.id, exc, lease)
        # Done: its once-only claims, out of the running set, the lease given up: one call
        # (already made with the final record when nothing was left to do after it).
        lease.stop_renewing()
        if not run.released:
            self.transitions.release(job.id, lease.token, run.claims)
        lease.released()
        return record

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
    def _run(
        self, job: JobDocument, lease: LeaseKeeper, run: RunRecord, raw: str
    ) -> JobRecord | None:
        lost_runs: list[int] = []
        start = self._start_mutation(lost_runs)
        while True:  # compare-and-set from the record the claim read
            record = start(run.record.model_copy(deep=True))
            if lost_runs:  # attempts exhausted by worker deaths: end it, result.json first
                lost = WorkerLost(f"the worker running this job was lost {lost_runs[0]} times")
                log.warning("job %s: %s; giving up", job.id, lost.message)
                return self._end(job, lost, lease=lease)
            if record is None:
                return None
            found = self.transitions.start(job.id, raw, record)
            if found is None:
                break
            if not found:
                return None  # the record expired meanwhile
            raw, run.record = found, JobRecord.model_validate_json(found)
        run.record = record
        lease.attempt = record.attempt
        if record.attempt > 1:
            log.info("job %s: attempt %d on %s", job.id, record.attempt, self.ctx.worker_name)
        self.emit(job.id, "job.started", record, key=f"a{record.attempt}", document=run.document)
        control = JobControl(
            job.id,
            self.store,
            timeout_s=job.timeout_s,
            on_progress=lambda progress: self._progress_event(job.id, progress, run),
            on_preview=lambda progress: self._preview_event(job.id, progress, run),
            progress_every_s=self.settings.progress_webhook_interval_s,
            lease=lease,
            draining=self.ctx.draining,
            cancels=self.heart,
            write_progress=lambda progress: self._write_progress(run, progress),
        )
        try:
            control.check()
            # Before any fetch, whoever enqueued the job: what its tenant may name.
            self.grants.check(job.input, job.tenant)
            output = self.handlers[job.kind].handle(job, job.input, control)
        except RunInterrupted:
            raise
        except ImageqError as exc:
            if exc.retryable:
                raise
            return self._finish(job, exc, control.metrics, lease=lease, run=run)
        except Exception as exc:
            # The tenant reads an error id; the log and the operators' view the detail.
            error = ErrorDetails(self.store).report(exc, job.id)
            return self._finish(job, error, control.metrics, lease=lease, run=run)
        return self._finish(job, None, control.metrics, output, lease=lease, run=run)

    def _write_progress(self, run: RunRecord, progress: dict[str, Any]) -> bool:
        with run.lock:
            record = run.record.model_copy(update={"progress": progress})
            state, _ = self.transitions.write(run, record)
        return state is Written.OK

    def _start_mutation(self, lost_runs: list[int]) -> Callable[[JobRecord], JobRecord | None]:
        settings, worker = self.settings, self.ctx.worker_name

        def mutate(rec: JobRecord) -> JobRecord | None:
            lost_runs.clear()
            if rec.is_final:
                return None
            if rec.status == JobStatus.RUNNING and runs_lost(rec) >= settings.max_attempts:
                lost_runs.append(runs_lost(rec))
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
