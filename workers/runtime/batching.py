"""Micro-batching: items that arrive together share one forward pass.

Worker threads (one per job in flight) submit their items and wait; one batcher thread
owns the model, gathers items with the same ``batch_key`` for up to ``max_wait_ms`` or
``max_batch`` items, and runs them together. A job's own image list counts toward the
batch, and a large job is spread over several batches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from api_client.errors import Canceled, ImageqError, ModelError, OutOfMemory
from workers.predictors.base import BatchedPredictor

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    item: Any
    key: Hashable
    future: Future[tuple[Any, int]]
    is_canceled: Callable[[], bool]
    enqueued_at: float = field(default_factory=time.monotonic)


class Ticket:
    """One announced job; ``arrived`` once it has submitted (or given up)."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher
        self._open = True

    def arrived(self) -> None:
        if self._open:
            self._open = False
            self._batcher._arrived()


class Batcher:
    def __init__(self, predictor: BatchedPredictor, max_batch: int, max_wait_ms: int) -> None:
        self.predictor = predictor
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0, max_wait_ms) / 1000.0
        self._pending: list[_Pending] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches_run = 0
        # Jobs that have started (fetching images) but not submitted yet: the only
        # company worth waiting for. With none on the way a lone job runs at once.
        self._incoming = 0

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="imageq-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    # -- producer side ----------------------------------------------------------------
    @contextmanager
    def incoming(self) -> Iterator[Ticket]:
        """Announce a job that will submit soon, so a forming batch waits for it."""
        ticket = Ticket(self)
        with self._cond:
            self._incoming += 1
        try:
            yield ticket
        finally:
            ticket.arrived()

    def _arrived(self) -> None:
        with self._cond:
            self._incoming -= 1
            self._cond.notify_all()

    def run(
        self,
        items: Sequence[Any],
        is_canceled: Callable[[], bool] = lambda: False,
        ticket: Ticket | None = None,
    ) -> tuple[list[Any], int]:
        """Run ``items`` (one job's) and wait; returns (results, largest batch size)."""
        futures = self.submit(items, is_canceled)
        if ticket is not None:
            ticket.arrived()
        results, sizes = [], []
        for fut in futures:
            result, size = fut.result()
            results.append(result)
            sizes.append(size)
        return results, max(sizes, default=0)

    def submit(
        self, items: Sequence[Any], is_canceled: Callable[[], bool] = lambda: False
    ) -> list[Future[tuple[Any, int]]]:
        pending = [
            _Pending(item, self.predictor.batch_key(item), Future(), is_canceled) for item in items
        ]
        with self._cond:
            if self._stopping:
                raise ModelError("worker is shutting down")
            self._pending.extend(pending)
            self._cond.notify_all()
        return [p.future for p in pending]

    # -- batcher thread ---------------------------------------------------------------
    def _take_batch(self) -> list[_Pending] | None:
        with self._cond:
            while not self._pending:
                if self._stopping:
                    return None
                self._cond.wait(0.5)
            first = self._pending[0]
            # Wait for company only as long as the oldest item may wait.
            deadline = first.enqueued_at + self.max_wait_s
            while True:
                same = [p for p in self._pending if p.key == first.key]
                remaining = deadline - time.monotonic()
                full = len(same) >= self.max_batch
                if full or remaining <= 0 or self._stopping or self._incoming <= 0:
                    break
                self._cond.wait(remaining)
            batch = same[: self.max_batch]
            taken = {id(p) for p in batch}
            self._pending = [p for p in self._pending if id(p) not in taken]
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = []
            for p in batch:
                # A job canceled before its batch ran is dropped without model work.
                if p.is_canceled():
                    p.future.set_exception(Canceled("canceled before its batch ran"))
                else:
                    live.append(p)
            if live:
                self._run(live)

    def _run(self, batch: list[_Pending]) -> None:
        try:
            results = self.predictor.predict([p.item for p in batch])
            self.batches_run += 1
        except OutOfMemory:
            if len(batch) == 1:
                batch[0].future.set_exception(OutOfMemory("out of memory on a single item"))
                return
            # Remember the lower limit so the next batches do not hit the wall again.
            half = max(1, len(batch) // 2)
            self.max_batch = min(self.max_batch, half)
            log.warning("out of memory at batch %d; retrying at %d", len(batch), half)
            self._run(batch[:half])
            self._run(batch[half:])
            return
        except ImageqError as exc:
            self._isolate(batch, exc)
            return
        except Exception as exc:
            self._isolate(batch, ModelError(f"{type(exc).__name__}: {exc}"))
            return
        for p, result in zip(batch, results, strict=True):
            p.future.set_result((result, len(batch)))

    def _isolate(self, batch: list[_Pending], exc: ImageqError) -> None:
        """A failed batch is rerun item by item, so one bad item fails only its job."""
        if len(batch) == 1:
            batch[0].future.set_exception(exc)
            return
        for p in batch:
            self._run([p])
