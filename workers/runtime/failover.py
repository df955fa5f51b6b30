"""Fast failover: a job whose worker died runs again within seconds, not after the broker's
visibility timeout.

Every run holds a lease in Redis renewed by a heartbeat (``control.LeaseKeeper``). A run
also keeps its job in the *running set*, a sorted set whose score is the time its lease
could next lapse; each renewal pushes it forward. Every worker process (GPU kinds and the
webhooks worker alike) runs a ``FailoverSweeper`` that looks only at entries whose time
has come. One Lua script decides, atomically, for one entry:

- the job's lease is still held: a live (slow) worker; look again when it could lapse;
- no lease and the job is not final: its worker died (or stalled past the TTL, or
  crashed between handing a job back and re-sending it). The script moves the entry a
  grace period ahead (``resend_grace_s``), out of ``due``, so exactly one sweeper wins,
  and that one re-sends the stored job document to the job's queue with the same task
  id. The entry stays: should that sweeper die before the send, or the re-sent
  message's worker die before claiming it, a sweeper looks again after the grace and
  re-sends it (the grace doubles with each re-send, up to the visibility timeout, so a
  long queue does not fill with copies). The next run's claim scores the entry by its
  own lease, takes a new lease, counts its attempt; ``max_attempts`` still ends a job
  that kills every worker, as ``worker_lost``. A copy sent twice is harmless: its
  claim finds the job leased (it waits) or final (a no-op);
- no lease and the job is final: the worker died between the final record and its last
  side effects (``result.json``, the final webhook). The winner runs ``finalize`` and
  only then lets go of the entry.

So a job leaves the set only when its record is gone, or it is final with its side
effects done. The broker's own redelivery of the dead worker's message, an hour later,
finds the job final (a no-op) or leased (it waits, as any second delivery does): the
visibility timeout stays the backstop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from imageq.api_client.records import Document, RecordStore
from imageq.api_client.schemas import JobRecord, JobStatus
from imageq.api_client.scripts import script
from imageq.api_client.settings import Settings
from imageq.workers.runtime.ticker import Ticker

log = logging.getLogger(__name__)

#: Sends a stored job document to its kind's queue, on its kind's broker.
SendJob = Callable[[Document], None]


def resend_grace_s(settings: Settings) -> tuple[float, float]:
    """How long a claimed entry waits before a sweeper looks again: first, and at most.

    First: a lease's time and a scan, time enough for the re-sent message's worker to
    claim it (the claim then scores the entry by its own lease). Doubled with each
    re-send of the job, up to the visibility timeout: a message that waits in a long
    queue is not copied every half minute, and past that the broker redelivers anyway.
    """
    first = settings.lease_ttl_s + settings.failover_scan_s
    return first, max(first, float(settings.visibility_timeout_s))


class Action(StrEnum):
    """What the sweeper found to do about one due job (lua/inspect.lua)."""

    #: Not due any more: another sweeper was first.
    SKIP = "skip"
    #: A live lease: looked at again when it could lapse.
    HELD = "held"
    #: No record left: forgotten.
    GONE = "gone"
    #: No lease, not final: claimed for a re-send (its worker died).
    REDISPATCH = "redispatch"
    #: No lease, final: claimed to complete its last side effects.
    FINALIZE = "finalize"


@dataclass(frozen=True)
class Verdict:
    """What the sweeper found (and, for ``redispatch``/``finalize``, claimed) for a job."""

    action: Action
    status: str
    attempt: int
    worker: str


class RunningSet:
    """Jobs that a worker runs (or is about to run again), scored by when to look at them."""

    def __init__(self, store: RecordStore) -> None:
        self.store = store
        self.key = store.keys.running()

    def watch(self, job_id: str, look_in_s: float) -> None:
        """Keep ``job_id`` in the set; a sweeper looks at it after ``look_in_s``."""
        self.store.redis.zadd(self.key, {job_id: time.time() + look_in_s})

    def forget(self, job_id: str) -> None:
        """The run is over and all its side effects are done (called holding the lease)."""
        self.store.redis.zrem(self.key, job_id)

    def watch_if_free(self, job_id: str, look_in_s: float) -> None:
        """``watch`` unless a lease is held: a run that just started watches it itself."""
        keys = [self.key, self.store.keys.lease(job_id)]
        script(self.store.redis, "watch_if_free")(keys=keys, args=[job_id, time.time() + look_in_s])

    def score(self, job_id: str) -> float | None:
        value = self.store.redis.zscore(self.key, job_id)
        return None if value is None else float(value)

    def due(self, limit: int = 100) -> list[str]:
        found = self.store.redis.zrangebyscore(self.key, "-inf", time.time(), start=0, num=limit)
        return [str(job_id) for job_id in found]

    def inspect(self, job_id: str, recheck_s: float) -> Verdict:
        """Atomically: look at one due job and claim it if its lease lapsed (its entry
        moved a grace period ahead, not removed: see the module's docstring)."""
        inspect = script(self.store.redis, "inspect")
        settings = self.store.settings
        first, most = resend_grace_s(settings)
        keys = [
            self.key,
            self.store.keys.job(job_id),
            self.store.keys.lease(job_id),
            self.store.keys.resent(job_id),
        ]
        args: list[str | float] = [
            job_id,
            time.time(),
            recheck_s,
            first,
            most,
            settings.result_ttl_s,
        ]
        action, status, attempt, worker = inspect(keys=keys, args=args)
        return Verdict(Action(action), str(status), int(attempt), str(worker))


class FailoverSweeper:
    """Re-dispatches jobs whose lease lapsed and completes jobs that died while ending."""

    def __init__(
        self,
        store: RecordStore,
        send_job: SendJob,
        finalize: Callable[[str], None],
        fail_lost: Callable[[str, str], None],
        *,
        every_s: float,
        worker_name: str,
    ) -> None:
        self.store = store
        self.running = RunningSet(store)
        self.send_job = send_job
        self.finalize = finalize
        self.fail_lost = fail_lost
        self.every_s = max(0.05, every_s)
        self.worker_name = worker_name
        # Jitter, so that the sweepers of a fleet started together do not run in step.
        self._ticker = Ticker("imageq-failover", self.every_s, self.sweep, jitter=0.2)

    def sweep(self) -> list[tuple[str, str]]:
        """One pass over the due entries; returns (job id, action) for each one acted on."""
        acted: list[tuple[str, str]] = []
        for job_id in self.running.due():
            verdict = self.running.inspect(job_id, recheck_s=self.every_s)
            act = {Action.REDISPATCH: self._redispatch, Action.FINALIZE: self._finalize}.get(
                verdict.action
            )
            if act is not None and act(job_id, verdict):
                acted.append((job_id, verdict.action))
        return acted

    def _redispatch(self, job_id: str, verdict: Verdict) -> bool:
        document = self.store.get_document(job_id)
        if document is None:
            return self._lost(job_id, verdict)
        try:
            self.send_job(document)
        except Exception as exc:
            # Due again soon: the next pass (here or on another worker) tries again.
            self.running.watch(job_id, self.every_s)
            log.warning("job %s: re-dispatch failed (%s); will try again", job_id, exc)
            return False
        # The entry stays, a grace period ahead: the re-sent message's claim takes it
        # over; should no worker claim it, a later pass re-sends it.
        if verdict.status == "running":
            log.warning(
                "job %s: lease of worker %s lapsed during attempt %d (worker lost?); "
                "re-dispatched by %s as attempt %d",
                job_id,
                verdict.worker or "?",
                verdict.attempt,
                self.worker_name,
                verdict.attempt + 1,
            )
        else:
            log.warning(
                "job %s: %s without a lease (its worker stopped before re-sending it); "
                "re-dispatched by %s",
                job_id,
                verdict.status,
                self.worker_name,
            )
        return True

    def _lost(self, job_id: str, verdict: Verdict) -> bool:
        """The job's stored document expired (it lives ``result_ttl_s`` from submission;
        the record, rewritten at each step, outlives it): nothing to re-send.

        It is failed as ``worker_lost`` rather than left to the broker's redelivery: the
        dead worker's message may be gone (a hand-back, a retry), and a record that says
        "running" until it too expires would have its client wait for nothing. Ended,
        the client sees why (result.json and all; no webhook, its address was in the
        document). The entry stays watched until that is recorded.
        """
        log.error(
            "job %s: lease of worker %s lapsed but the job's document has expired; "
            "failing it as worker_lost",
            job_id,
            verdict.worker or "?",
        )
        try:
            self.fail_lost(
                job_id,
                "the worker running this job was lost and the job "
                "can not run again: its stored document expired",
            )
        except Exception as exc:  # storage or Redis away: try again on a later pass
            self.running.watch(job_id, self.every_s)
            log.warning("job %s: failing it failed (%s); will try again", job_id, exc)
            return False
        self.running.forget(job_id)
        return True

    def _finalize(self, job_id: str, verdict: Verdict) -> bool:
        log.warning(
            "job %s: %s, but worker %s died before its last side effects; "
            "%s completes result.json and the final webhook",
            job_id,
            verdict.status,
            verdict.worker or "?",
            self.worker_name,
        )
        try:
            self.finalize(job_id)
        except Exception as exc:  # storage or broker away: try again on a later pass
            self.running.watch(job_id, self.every_s)
            log.warning("job %s: finalize failed (%s); will try again", job_id, exc)
            return False
        # Side effects done: only now may the job leave the set (the record is final, so
        # no run puts it back).
        self.running.forget(job_id)
        return True

    # -- the thread -----------------------------------------------------------------------
    def start(self) -> None:
        self._ticker.start()

    def stop(self) -> None:
        self._ticker.stop()


# -- handing a job on -----------------------------------------------------------------------


#: The record's count (in ``metrics``) of runs that stopped without losing their worker
#: (a hand-back, a transient retry): ``max_attempts`` counts only the other runs.
REQUEUED = "requeued"


def runs_lost(record: JobRecord) -> int:
    """Attempts that ended with their worker lost (or still running)."""
    return record.attempt - int(record.metrics.get(REQUEUED) or 0)


def back_to_queued(attempt: int | None) -> Callable[[JobRecord], JobRecord | None]:
    """A run that stops without ending its job (hand-back, transient retry): queued
    again, and the try not counted against ``max_attempts`` (it lost no worker).

    The attempt number itself never goes back: the next run is a new attempt whose
    events (``job.started``, progress) carry ids of their own, which the webhooks worker
    would otherwise drop as already delivered.
    """

    def mutate(rec: JobRecord) -> JobRecord | None:
        if rec.status != JobStatus.RUNNING or (attempt is not None and rec.attempt != attempt):
            return None
        rec.status = JobStatus.QUEUED
        rec.metrics = {**rec.metrics, REQUEUED: int(rec.metrics.get(REQUEUED) or 0) + 1}
        return rec

    return mutate


def hand_back(
    running: RunningSet,
    document: Document,
    attempt: int | None,
    release: Callable[[], None],
    send_job: SendJob | None,
) -> None:
    """Give a stopped job back (its worker is shutting down) and re-send it at once.

    Crash-safe in this order: the job stays in the running set (due soon) while queued
    and unleased, so a sweeper re-sends it should this worker die before it does; the
    lease goes before the message, so the next worker does not find it held and wait.
    """
    store, job_id = running.store, str(document["id"])
    _, changed = store.update(job_id, back_to_queued(attempt))
    if not changed:  # not this run's to hand back any more
        release()
        return
    running.watch(job_id, 2 * store.settings.failover_scan_s)
    release()
    if send_job is None:
        return
    try:
        send_job(document)
    except Exception as exc:
        log.warning("job %s: re-dispatch failed (%s); a sweeper re-sends it", job_id, exc)
        return
    # Watched until a worker claims the message (the claim scores it by its lease): a
    # worker that dies before claiming it does not leave it to the visibility timeout.
    running.watch_if_free(job_id, resend_grace_s(store.settings)[0])
    log.info("job %s: re-dispatched to its queue", job_id)
