"""How a run ends: the final record, ``result.json`` before it, the final event after
it, each once (and the side effects a crash skipped, completed by anyone later).

``RunEnding`` is the half of ``JobRunner`` (``lifecycle``) that records and notifies; a
run that holds its job's lease and knows its record ends with ``_finish`` (no re-reads,
one script for the final record), everything else with ``_end``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from imageq.api_client.error_details import ErrorDetails, is_reported
from imageq.api_client.errors import Canceled, ImageqError, InternalError, WorkerLost
from imageq.api_client.object_urls import hide_storage_root
from imageq.api_client.records import Document, RecordStore, final_record, utcnow
from imageq.api_client.schemas import JobDocument, JobRecord, JobStatus
from imageq.api_client.settings import Settings
from imageq.api_client.webhooks import event_id, preview_key, progress_key
from imageq.workers.io.storage import Storage
from imageq.workers.runtime.context import Deferred, Output, WorkerContext
from imageq.workers.runtime.control import LeaseKeeper, LeaseLost
from imageq.workers.runtime.failover import RunningSet, back_to_queued
from imageq.workers.runtime.jobstate import JobState
from imageq.workers.runtime.transitions import RunRecord, Transitions, Written, stored_webhook
from imageq.workers.webhooks.post import WebhookEvent

log = logging.getLogger(__name__)

#: The once-only claim of the delivery that counts a job (tasks/outcome.py).
COUNTED = "counted"


def result_key(job_id: str) -> str:
    return f"jobs/{job_id}/result.json"


class RunEnding:
    """Final records, result.json and final events, once; mixed into ``JobRunner``."""

    ctx: WorkerContext
    settings: Settings
    store: RecordStore
    state: JobState
    running: RunningSet
    transitions: Transitions
    #: Jobs whose count this runner claimed when it ended them (``take_counted``).
    counted: set[str]

    def _finish(
        self,
        job: JobDocument,
        error: ImageqError | None,
        metrics: dict[str, Any],
        output: Output | None = None,
        *,
        lease: LeaseKeeper,
        run: RunRecord,
    ) -> JobRecord | None:
        """``_end`` for a run that holds the lease and knows its record: no re-reads.

        The lease is checked before result.json (a run that lost it must not overwrite
        the newer run's), result.json is written before the final record, and one script
        writes the final record while the lease and the attempt are still this run's.
        """
        lease.verify()
        with run.lock:
            # Shallow: only top-level fields change here, and final_record copies deep.
            current = run.record.model_copy()
        key, final = self._final(current, error, metrics, output)
        self.ctx.storage.put(key, _result_json(final, self.ctx.storage), "application/json")
        webhook = stored_webhook(run.document)
        event_type = "job." + final.status
        send = webhook is not None and event_type in webhook.get("events", ())
        # This delivery ended the job, so it is the one that counts it (tasks/outcome.py).
        # With no event left to send, the final write also claims result.json and lets
        # go of the job: one call. With one, each step stays where a crash can find it:
        # result.json claimed, the event sent, the event claimed, then the job let go.
        with run.lock:
            state, found = self.transitions.write(
                run, final, final=True, result_written=not send, release=None if send else [COUNTED]
            )
        if state in (Written.MOVED, Written.LOST):
            # This run stalled after its lease check: its result.json may have landed over
            # the newer run's, which rewrites it once it ends the job (the script marked
            # it stale).
            attempt = found.attempt if found is not None else "?"
            raise LeaseLost(f"job {job.id}: attempt {attempt} runs elsewhere")
        if state not in (Written.OK, Written.REWRITE):  # it ended elsewhere, or expired
            self._result_written_too_late(job.id)
            return None
        self.counted.add(job.id)
        if state is Written.OK and not send:
            run.released = True
            return final
        if state is Written.REWRITE:
            self.ctx.storage.put(key, _result_json(final, self.ctx.storage), "application/json")
        self.state.claim_once(job.id, "result.json")
        if webhook is not None and send:
            # Sent first, marked done after, as ``emit`` does.
            self._send(job.id, event_type, final, webhook)
            self.state.claim_once(job.id, "webhook:" + event_type)
        run.claims.append(COUNTED)
        return final

    def _result_written_too_late(self, job_id: str) -> None:
        """This run wrote result.json, then found its job ended by another run: written
        again from the final record (and any other side effect completed)."""
        self.state.forget_once(job_id, "result.json")
        self.finalize(job_id)

    def _final(
        self,
        current: JobRecord,
        error: ImageqError | None,
        metrics: dict[str, Any] | None,
        output: Output | None,
    ) -> tuple[str, JobRecord]:
        """The final record made from ``current`` (changed in place: a copy), and the
        key of its result.json."""
        key = result_key(current.id)
        current.result_uri = self.ctx.storage.uri(key)
        current.result_url = self.ctx.storage.public_url(key) or None
        if metrics:
            current.metrics = {**current.metrics, **metrics}
        if error is not None and error.code == "internal" and not is_reported(error.message):
            # Storage and other internal failures name buckets, paths and endpoints:
            # the record, result.json and webhooks carry an error id instead.
            error = ErrorDetails(self.store).report(error, current.id)
        status = _status(current.id, error)
        return key, final_record(current, status, output=output, error=error)

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
        current = self.store.get(job_id)
        if current is None or current.is_final:
            self.finalize(job_id)
            return None
        attempt = None if lease is None else lease.attempt
        if lease is not None:
            lease.verify()
            if attempt is not None and current.attempt != attempt:
                raise LeaseLost(f"job {job_id}: attempt {current.attempt} runs elsewhere")
        key, final = self._final(current, error, metrics, output)
        try:
            self.ctx.storage.put(key, _result_json(final, self.ctx.storage), "application/json")
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
            if wrote and not self.transitions.mark_result_stale(job_id):
                self._result_written_too_late(job_id)  # it ended since
                return None
            raise LeaseLost(f"job {job_id}: attempt {record.attempt} runs elsewhere")
        if not changed and wrote:
            self._result_written_too_late(job_id)
            return None
        if wrote:
            self.state.claim_once(job_id, "result.json")
        self.finalize(job_id)
        return record if changed else None

    def retry_or_give_up(
        self, job_id: str, exc: ImageqError, lease: LeaseKeeper | None = None
    ) -> JobRecord | None:
        """Storage or network trouble: ``Deferred`` with a backoff a few times, then fail
        the job (``internal``, "gave up after ...")."""
        settings = self.settings
        counter = self.store.keys.transient(job_id)
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

    def fail_lost(self, job_id: str, message: str) -> None:
        """End a job that lost its worker and cannot run again (the failover sweeper's
        way out for a job whose document expired): ``worker_lost``, result.json first.

        No lease: nothing runs it (its lease lapsed); should a late delivery start it
        meanwhile, whichever final write comes first wins, as with any two endings.
        """
        self._end(job_id, WorkerLost(message))

    # -- side effects, once -----------------------------------------------------------

    def finalize(self, job_id: str) -> None:
        """Write result.json and send the final event if a crash skipped them.

        Safe to call any number of times, from any worker.
        """
        record = self.store.get(job_id)
        if record is None or not record.is_final:
            return
        # Once per job (a claim in the same script): a no-op when the final write did it.
        self.transitions.usage.charge(record)
        key = result_key(job_id)
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
            # A run that lost the job may have written its result.json over this one's.
            stale = self.transitions.take_stale_mark(job_id)
            if stale or not self.state.done_once(job_id, "result.json"):
                data = _result_json(record, self.ctx.storage)
                self.ctx.storage.put(key, data, "application/json")
                self.state.claim_once(job_id, "result.json")
        finally:
            # Storage that stays down (the job failed for it) must not also swallow the
            # final event: the record in Redis is final either way.
            self.emit(job_id, "job." + record.status, record)

    def emit(
        self,
        job_id: str,
        event_type: str,
        record: JobRecord,
        key: str = "",
        document: Document | None = None,
    ) -> None:
        """Send ``event_type`` if the job's webhook asks for it; a final event once.

        ``document``: the job's stored document, when the caller holds it already.
        """
        if document is None:
            document = self.store.get_document(job_id) or {}
        webhook = stored_webhook(document)
        if not webhook or event_type not in webhook.get("events", ()):
            return
        final = record.is_final and event_type not in ("job.progress", "job.preview")
        done = "webhook:" + event_type
        if final and self.state.done_once(job_id, done):
            return
        # Sent first, marked done after: a crash between the two sends it again from a
        # later finalize (sweeper, redelivery) with the same webhook-id, and the webhooks
        # worker delivers one webhook-id once. Marked first, a crash would lose it.
        self._send(job_id, event_type, record, webhook, key)
        if final:
            self.state.claim_once(job_id, done)

    def _send(
        self,
        job_id: str,
        event_type: str,
        record: JobRecord,
        webhook: dict[str, Any],
        key: str = "",
    ) -> None:
        event = WebhookEvent(
            webhook_id=event_id(job_id, event_type, record.created_at, key),
            url=webhook["url"],
            type=event_type,
            timestamp=utcnow(),
            data=_shown(record, self.ctx.storage),
        )
        self.ctx.send_webhook(event)

    def _progress_event(self, job_id: str, progress: dict[str, Any], run: RunRecord) -> None:
        with run.lock:
            record = run.record
        key = progress_key(record.attempt, progress)
        self.emit(job_id, "job.progress", record, key=key, document=run.document)

    def _preview_event(self, job_id: str, progress: dict[str, Any], run: RunRecord) -> None:
        with run.lock:
            record = run.record
        key = preview_key(record.attempt, progress)
        self.emit(job_id, "job.preview", record, key=key, document=run.document)


def _status(job_id: str, error: ImageqError | None) -> JobStatus:
    if error is None:
        return JobStatus.SUCCEEDED
    status = JobStatus.CANCELED if isinstance(error, Canceled) else JobStatus.FAILED
    log.info("job %s %s: %s", job_id, status, error)
    return status


def _shown(record: JobRecord, storage: Storage) -> dict[str, Any]:
    """A record as a webhook and result.json carry it: a tenant's job names its files
    ``storage://...``, not by the storage root (as the gateway shows it)."""
    data = record.to_json()
    if record.tenant is None:
        return data
    shown: dict[str, Any] = hide_storage_root(data, storage.uri("x")[:-1])
    return shown


def _result_json(record: JobRecord, storage: Storage) -> bytes:
    return json.dumps(_shown(record, storage), indent=2).encode()
