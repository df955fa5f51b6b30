"""What a running job can ask of the system: stop?, report progress, keep its lease.

A run can also end without a final status, because the job is no longer this run's to
finish: ``LeaseLost`` (another worker holds it now) and ``HandedBack`` (this worker is
shutting down and gave the job back). Both are ``ImageqError``s so that they pass
through ``model_errors`` and the batchers unchanged, and the runner catches them before
any other error: neither may record anything.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis

from imageq.api_client.errors import Canceled, ImageqError, JobTimeout
from imageq.api_client.records import RecordStore
from imageq.api_client.schemas import JobStatus
from imageq.workers.runtime.failover import RunningSet
from imageq.workers.runtime.jobstate import JobState
from imageq.workers.runtime.ticker import Ticker

if TYPE_CHECKING:
    from imageq.workers.runtime.leases import Heart

log = logging.getLogger(__name__)

ProgressSink = Callable[[dict[str, Any]], None]
#: Writes a run's progress into its record (``transitions``); True when written.
ProgressWriter = Callable[[dict[str, Any]], bool]

#: How often a step re-reads the lease itself rather than trusting the heartbeat thread:
#: a worker frozen past its TTL (SIGSTOP, a paused VM) resumes in its step loop, maybe
#: before its heartbeat thread has run at all.
VERIFY_EVERY_S = 1.0


class RunInterrupted(ImageqError):
    """The run stopped and the job is someone else's to finish: record nothing."""


class LeaseLost(RunInterrupted):
    """Another worker holds this job's lease now (this one stalled or was cut off)."""


class HandedBack(RunInterrupted):
    """The worker is shutting down: the run saved what it could and gave the job back."""


class JobControl:
    """Passed to predictors as their step callback: ``control(step, total, extra)``.

    Each call records progress (throttled) and raises ``Canceled`` or ``JobTimeout``, so
    a denoising or training loop stops at its next step and frees the GPU.
    """

    RECORD_EVERY_S = 0.2

    def __init__(
        self,
        job_id: str,
        store: RecordStore,
        *,
        timeout_s: float | None,
        write_progress: ProgressWriter,
        on_progress: ProgressSink | None = None,
        on_preview: ProgressSink | None = None,
        progress_every_s: float = 2.0,
        lease: LeaseKeeper | None = None,
        draining: threading.Event | None = None,
        cancels: Heart | None = None,
    ) -> None:
        self.job_id = job_id
        self.store = store
        # The worker's cancel set: a step's check costs no round trip (``leases``).
        self.cancels = cancels
        self.write_progress = write_progress
        self.started = time.monotonic()
        self.deadline = None if timeout_s is None else self.started + timeout_s
        self.timeout_s = timeout_s
        self.on_progress = on_progress
        #: Told of each step preview published (``job.preview`` webhooks).
        self.on_preview = on_preview
        # The latest preview rides along in every progress write; the lock keeps a step's
        # write and a preview's (from another thread) from undoing each other.
        self._preview: dict[str, Any] | None = None
        self._progress: dict[str, Any] = {}
        self._progress_lock = threading.Lock()
        self.progress_every_s = progress_every_s
        self.lease = lease
        self.draining = draining
        #: Set by a handler whose job can stop and resume elsewhere (a fine-tune, from its
        #: checkpoints): on SIGTERM it is handed back; other jobs finish on SIGTERM.
        self.hands_back = False
        self._last_record = 0.0
        self._last_event = 0.0
        self.metrics: dict[str, Any] = {}
        self._model_s = 0.0
        self._charge_lock = threading.Lock()

    def is_canceled(self) -> bool:
        if self.cancels is not None:
            seen = self.cancels.canceled(self.job_id)
            if seen is not None:
                return seen
        return self.store.cancel_requested(self.job_id)

    def charge_model(self, seconds: float) -> None:
        """The job used the model for ``seconds`` more (its share of a batched call, a
        training run): ``metrics.model_s``, what its tenant's usage counts. Called from
        the batcher's thread as calls end, so a canceled or failed job is charged too."""
        with self._charge_lock:
            self._model_s += max(0.0, seconds)
            self.metrics["model_s"] = round(self._model_s, 6)

    def hold(self) -> None:
        """Raise ``LeaseLost`` unless this run still holds its job, asked of Redis now:
        before a write another run of the job could be making too (a checkpoint, a
        prune, an adapter published)."""
        if self.lease is not None:
            self.lease.verify()

    def hand_back_requested(self) -> bool:
        """The worker is shutting down and this job resumes elsewhere (see ``hands_back``)."""
        return self.hands_back and self.draining is not None and self.draining.is_set()

    def _stop_reason(self) -> Exception | None:
        if self.lease is not None:
            try:
                self.lease.verify(max_age_s=VERIFY_EVERY_S)
            except LeaseLost as lost:
                return lost
            except redis.RedisError as exc:
                # Redis restarting: the heartbeat keeps trying, and the job goes on; the
                # final record is written only after a check that did reach Redis.
                log.debug("job %s: lease not checked: %s", self.job_id, exc)
        if self.deadline is not None and time.monotonic() > self.deadline:
            return JobTimeout(f"job ran past its timeout_s of {self.timeout_s}")
        if self.is_canceled():
            return Canceled("canceled while running")
        if self.hand_back_requested():
            return HandedBack("the worker is shutting down")
        return None

    def check(self) -> None:
        reason = self._stop_reason()
        if reason is not None:
            raise reason

    def __call__(self, step: int, total: int, extra: dict[str, Any] | None = None) -> None:
        self.progress(step, total, **(extra or {}))

    def progress(self, step: int, total: int, **extra: Any) -> None:
        now = time.monotonic()
        last = step >= total
        # The step a job stopped at is always recorded, throttled or not.
        reason = self._stop_reason()
        # A lost lease leaves the record to the run that holds it now.
        record = not isinstance(reason, LeaseLost)
        if record and (
            last or reason is not None or now - self._last_record >= self.RECORD_EVERY_S
        ):
            self._last_record = now
            progress = {"step": step, "total": total, **extra}
            with self._progress_lock:
                self._progress = progress
                if self._preview is not None:
                    progress = {**progress, "preview": self._preview}
                self.write_progress(progress)
            if self.on_progress is not None and (
                last or now - self._last_event >= self.progress_every_s
            ):
                self._last_event = now
                self.on_progress(progress)
        if reason is not None:
            raise reason

    def preview(self, preview: dict[str, Any]) -> None:
        """A step preview was stored: ``progress.preview`` from now on, then the event."""
        with self._progress_lock:
            self._preview = preview
            progress = {**self._progress, "preview": preview}
            written = self.write_progress(progress)
        if written and self.on_preview is not None:
            self.on_preview(progress)

    def images_progress(self, stage: str, images: int) -> Callable[[int, int], None] | None:
        """Progress of a job of several images (``images_done`` of ``images``), as its
        batches come back; a single image has nothing to report in between."""
        if images < 2:
            return None

        def report(done: int, total: int) -> None:
            self.progress(done, total, stage=stage, images_done=done, images=total)

        return report


class LeaseKeeper:
    """Holds a job's lease while it runs, so a redelivered copy waits instead of running.

    A heartbeat renews it every ``every_s`` and keeps the job in the running set, where
    the failover sweepers look for runs whose lease lapsed: the worker's one lease thread
    (``heart``, ``imageq.workers.runtime.leases``), or a thread of its own. ``verify`` checks it
    synchronously (before a step, an output or the final record), since a worker that
    was frozen may resume before its heartbeat does.
    """

    def __init__(
        self,
        store: RecordStore,
        job_id: str,
        token: str,
        every_s: float,
        running: RunningSet | None = None,
        *,
        heart: Heart | None = None,
        watched: bool = False,
    ) -> None:
        self.store, self.job_id, self.token, self.every_s = store, job_id, token, every_s
        self.state = JobState(store)
        self.running = running
        self.heart = heart
        # Already in the running set (the claim that took the lease put it there).
        self._watched_at_start = watched
        self.ttl_s = store.settings.lease_ttl_s
        #: The attempt this run recorded; None until it started (the runner sets it).
        self.attempt: int | None = None
        self._stop = threading.Event()
        # Only without the worker's one lease thread (``heart``) does a lease beat itself.
        self._ticker = (
            None if heart is not None else Ticker(f"lease-{job_id}", every_s, self.keep_or_lose)
        )
        self._verified = time.monotonic()
        self._released = False
        self.lost = False

    def __enter__(self) -> LeaseKeeper:
        if not self._watched_at_start:
            self._watch()
        if self._ticker is None:
            assert self.heart is not None
            self.heart.add(self)
        else:
            self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def stop_renewing(self) -> None:
        """Stop the heartbeat (which would put the job back in the running set), still
        holding the lease: what a run does before it lets go of the job."""
        self._stop.set()
        if self.heart is not None:
            self.heart.remove(self)
        if self._ticker is not None:
            self._ticker.stop()

    def release(self) -> None:
        """Stop renewing and give the lease up (never one another worker holds)."""
        self.stop_renewing()
        if not self._released:
            self._released = True
            self.state.release_lease(self.job_id, self.token)

    def released(self) -> None:
        """Given up by other means (``transitions.release``): nothing left to release."""
        self.stop_renewing()
        self._released = True

    def renewed(self, now: float) -> None:
        """The heart renewed the lease (and the job's place in the running set)."""
        self._verified = now

    def keep_or_lose(self) -> None:
        """The heart could not renew the lease: take it back, or mark it lost."""
        if self.lost or self._stop.is_set():
            return
        try:
            if self._keep():
                self._verified = time.monotonic()
            else:
                self._mark_lost()
        except Exception as exc:  # Redis restarting: keep trying, the job goes on.
            log.warning("job %s: lease renewal failed: %s", self.job_id, exc)

    def _watch(self) -> None:
        if self.running is not None:
            # A sweeper looks only once the lease could have lapsed without a renewal.
            self.running.watch(self.job_id, self.ttl_s)

    def _still_ours(self) -> bool:
        """The lease expired unnoticed: is the job still this run's to take back?"""
        record = self.store.get(self.job_id)
        if record is None:
            return True  # nothing says another run took it
        if record.is_final:
            return False
        if self.attempt is None:
            return record.status == JobStatus.QUEUED or record.status == JobStatus.RUNNING
        return record.status == JobStatus.RUNNING and record.attempt == self.attempt

    def _keep(self) -> bool:
        """Renew, or take back a lapsed lease nobody else took; False when lost."""
        if self.state.renew_lease(self.job_id, self.token):
            self._watch()
            return True
        # Expired but free (Redis was away longer than the TTL, the worker was frozen):
        # take it back while the job is still this run's, or an hours-long job would run
        # on unprotected from a redelivered copy.
        if (
            self.state.lease_holder(self.job_id) is None
            and self._still_ours()
            and self.state.acquire_lease(self.job_id, self.token)
        ):
            self._watch()
            log.warning("job %s: lease had lapsed (worker stalled?); taken back", self.job_id)
            return True
        return False

    def _mark_lost(self) -> None:
        if not self.lost:
            self.lost = True
            holder = self.state.lease_holder(self.job_id)
            log.warning(
                "job %s: lease lost to %s (this worker stalled past the %.0f s TTL); "
                "abandoning attempt %s to the holder",
                self.job_id,
                holder or "another run",
                self.ttl_s,
                self.attempt,
            )

    def verify(self, max_age_s: float = 0.0) -> None:
        """Raise ``LeaseLost`` unless this run still holds the lease (checked in Redis
        when the last check is older than ``max_age_s``)."""
        if self.lost:
            raise LeaseLost(f"job {self.job_id}: another worker holds the job now")
        now = time.monotonic()
        if max_age_s and now - self._verified < max_age_s:
            return
        if self.state.lease_holder(self.job_id) == self.token or self._keep():
            self._verified = now
            return
        self._mark_lost()
        raise LeaseLost(f"job {self.job_id}: another worker holds the job now")
