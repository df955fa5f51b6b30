"""What a running job can ask of the system: stop?, report progress, keep its lease."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from api_client.errors import Canceled, JobTimeout
from api_client.records import RecordStore
from api_client.schemas import JobRecord, JobStatus

log = logging.getLogger(__name__)

ProgressSink = Callable[[dict[str, Any]], None]


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
        on_progress: ProgressSink | None = None,
        progress_every_s: float = 2.0,
    ) -> None:
        self.job_id = job_id
        self.store = store
        self.started = time.monotonic()
        self.deadline = None if timeout_s is None else self.started + timeout_s
        self.timeout_s = timeout_s
        self.on_progress = on_progress
        self.progress_every_s = progress_every_s
        self._last_record = 0.0
        self._last_event = 0.0
        self.metrics: dict[str, Any] = {}

    def is_canceled(self) -> bool:
        return self.store.cancel_requested(self.job_id)

    def _stop_reason(self) -> Exception | None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            return JobTimeout(f"job ran past its timeout_s of {self.timeout_s}")
        if self.is_canceled():
            return Canceled("canceled while running")
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
        if last or reason is not None or now - self._last_record >= self.RECORD_EVERY_S:
            self._last_record = now
            progress = {"step": step, "total": total, **extra}

            def mutate(rec: JobRecord) -> JobRecord | None:
                if rec.status != JobStatus.RUNNING:
                    return None
                rec.progress = progress
                return rec

            self.store.update(self.job_id, mutate)
            if self.on_progress is not None and (
                last or now - self._last_event >= self.progress_every_s
            ):
                self._last_event = now
                self.on_progress(progress)
        if reason is not None:
            raise reason


class LeaseKeeper:
    """Renews a job's lease while it runs, so a redelivered copy waits instead of running."""

    def __init__(self, store: RecordStore, job_id: str, token: str, every_s: float) -> None:
        self.store, self.job_id, self.token, self.every_s = store, job_id, token, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id}", daemon=True)
        self.lost = False

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.store.release_lease(self.job_id, self.token)

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                renewed = self.store.renew_lease(self.job_id, self.token)
                # Expired but free (Redis was away longer than the TTL): take it back, or
                # an hours-long job would run on unprotected from a redelivered copy.
                if not renewed and not self.store.acquire_lease(self.job_id, self.token):
                    self.lost = True
                    log.warning("job %s: lease lost (stalled past its TTL?)", self.job_id)
            except Exception as exc:  # Redis restarting: keep trying, the job goes on.
                log.warning("job %s: lease renewal failed: %s", self.job_id, exc)
