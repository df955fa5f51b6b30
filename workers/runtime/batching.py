"""Micro-batching: items that wait together share one model call.

Job threads submit items and wait; one batcher thread owns the model and runs the head
of the queue with every waiting item of equal ``batch_key``, up to ``max_batch`` (summed
item cost: images). A kind gives it its model (``Batched``) and an item's cost: caption
and match submit one item per image, generate one per job (cost ``num_images``),
inpaint and style one whose key is ``None`` (it runs alone). What every kind gets:

- A forming batch waits for company up to ``max_wait_ms``, only while jobs announced
  with ``incoming()`` are on their way (fetching images): a lone job runs at once.
- A job its ``check`` stops (cancel, timeout) leaves the queue while it waits (checked
  every ``poll_s``), and is dropped without model work if its batch comes first.
- ``BatchInterrupted`` fails only the item it names; the others go back to the head.
- Out of memory with several items requeues them at the head, and halves the size for
  their ``batch_key`` for the next ``recover_after`` calls; alone, the item fails.
- Any other failure of a shared call requeues its items to run alone: one bad item
  fails only its own job.
- With an ``AutoBatch`` (``imageq.workers.runtime.autobatch``), ``max_batch`` is the size it
  measured; it sees each call, and measures again when it asks, with nothing waiting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from imageq.api_client.errors import ModelError, OutOfMemory
from imageq.workers.predictors.base import Batched, BatchInterrupted
from imageq.workers.runtime.autobatch import AutoBatch

log = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

# How often a job waiting in the queue asks its ``check`` whether to leave.
POLL_S = 0.25
# Out of memory is usually one unusual job (a caption with 10 beams and 256 new tokens),
# not the device: its key runs at half size for this many successful calls, then at full
# size again. Heavy traffic that goes on pays a failed call per halving per 50 (~2%).
RECOVER_AFTER = 50


def _unit_cost(item: object) -> int:
    return 1


def _go_on() -> None:
    return None


def _free(seconds: float) -> None:
    return None


@dataclass(frozen=True)
class Ran(Generic[ResultT]):
    """One item's result and the model call it came from."""

    result: ResultT
    #: Summed cost (images) of the items in that call.
    batch_size: int
    #: Items (jobs, for generate) in that call.
    batch_items: int
    #: Seconds the call took.
    run_s: float
    #: This item's share of them (``run_s`` by cost): the shares of one call add up to it.
    share_s: float


@dataclass(eq=False)
class _Job(Generic[ItemT, ResultT]):
    """One submission: ``check`` is asked once per batch, and its items leave together."""

    check: Callable[[], None]
    #: Told the model seconds the job's items took, as each call ends (its usage).
    charge: Callable[[float], None] = _free
    entries: list[_Entry[ItemT, ResultT]] = field(default_factory=list)
    # Its thread stopped waiting (failed, stopped): its items need not run.
    gone: bool = False


@dataclass(eq=False)
class _Entry(Generic[ItemT, ResultT]):
    item: ItemT
    key: Hashable | None
    cost: int
    job: _Job[ItemT, ResultT]
    future: Future[Ran[ResultT]] = field(default_factory=Future)
    # Set after a shared call failed as a whole: the item runs alone next time.
    solo: bool = False
    # In the queue: neither taken by the batcher thread nor withdrawn (under the lock).
    queued: bool = True
    enqueued_at: float = field(default_factory=time.monotonic)

    @property
    def alone(self) -> bool:
        return self.solo or self.key is None


class Ticket:
    """One announced job; ``arrived`` once it has submitted (or given up)."""

    def __init__(self, on_arrived: Callable[[], None]) -> None:
        self._on_arrived = on_arrived
        self._open = True

    def arrived(self) -> None:
        if self._open:
            self._open = False
            self._on_arrived()


class Batcher(Generic[ItemT, ResultT]):
    """The one thread that calls ``model.predict``, first come first served.

    ``model.batch_key(item)`` returning ``None`` means the item always runs alone.
    """

    def __init__(
        self,
        model: Batched[ItemT, ResultT],
        *,
        max_batch: int,
        max_wait_ms: int,
        cost: Callable[[ItemT], int] = _unit_cost,
        poll_s: float = POLL_S,
        name: str = "imageq-batcher",
        autobatch: AutoBatch | None = None,
        recover_after: int = RECOVER_AFTER,
    ) -> None:
        self.model = model
        #: The most summed cost one call may hold (the tuned size).
        self.max_batch = max(1, max_batch)
        self.recover_after = recover_after
        # After out of memory: batch key -> (lower size, batches_run it holds until).
        self._backoff: dict[Hashable | None, tuple[int, int]] = {}
        self.autobatch = autobatch
        self.max_wait_s = max(0, max_wait_ms) / 1000.0
        self.poll_s = poll_s
        self._cost = cost
        self._name = name
        self._pending: list[_Entry[ItemT, ResultT]] = []
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
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Refuse new work, finish what waits, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    # -- job threads ------------------------------------------------------------------
    @contextmanager
    def incoming(self) -> Iterator[Ticket]:
        """Announce a job that will submit soon, so a forming batch waits for it."""
        ticket = Ticket(self._arrived)
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
        items: Sequence[ItemT],
        check: Callable[[], None] = _go_on,
        ticket: Ticket | None = None,
        on_item_done: Callable[[int, int], None] | None = None,
        charge: Callable[[float], None] = _free,
    ) -> list[Ran[ResultT]]:
        """Run one job's ``items`` and wait; one ``Ran`` per item, in order.

        ``check`` raises to stop the job (``JobControl.check``): while its items wait,
        the job leaves the queue with that error. The first item that fails fails the
        job, and its items still waiting leave the queue. ``on_item_done(done, total)``
        follows the items as they come back (progress); raising there stops the job too.
        ``charge(seconds)`` is told the job's share of each model call its items were in.
        """
        job = self._enqueue(items, check, charge)
        if ticket is not None:
            ticket.arrived()
        try:
            ran: list[Ran[ResultT]] = []
            for entry in job.entries:
                ran.append(self._wait(entry))
                if on_item_done is not None:
                    on_item_done(len(ran), len(job.entries))
            return ran
        except BaseException:
            self._withdraw(job)
            raise

    def submit(
        self,
        items: Sequence[ItemT],
        check: Callable[[], None] = _go_on,
        charge: Callable[[float], None] = _free,
    ) -> list[Future[Ran[ResultT]]]:
        """Queue one job's ``items`` without waiting; one future per item."""
        return [entry.future for entry in self._enqueue(items, check, charge).entries]

    def _enqueue(
        self, items: Sequence[ItemT], check: Callable[[], None], charge: Callable[[float], None]
    ) -> _Job[ItemT, ResultT]:
        job = _Job[ItemT, ResultT](check, charge)
        job.entries = [
            _Entry(item, self.model.batch_key(item), self._cost(item), job) for item in items
        ]
        with self._cond:
            if self._stopping:
                raise ModelError("the worker is shutting down")
            self._pending.extend(job.entries)
            self._cond.notify_all()
        return job

    def _wait(self, entry: _Entry[ItemT, ResultT]) -> Ran[ResultT]:
        job = entry.job
        while True:
            try:
                return entry.future.result(timeout=self.poll_s)
            except TimeoutError:
                pass
            with self._cond:
                waiting = any(e.queued for e in job.entries)
            if not waiting:
                continue  # running: a step callback stops it, or the call ends soon
            try:
                # A canceled or late job leaves the queue now, not when its turn comes.
                job.check()
            except BaseException:
                if self._withdraw(job):
                    raise
                # Taken meanwhile: the batcher thread checks it before the call.

    def _withdraw(self, job: _Job[ItemT, ResultT]) -> bool:
        """Take the job's waiting items out of the queue; False if none was waiting."""
        with self._cond:
            job.gone = True
            left = [e for e in job.entries if e.queued]
            for entry in left:
                entry.queued = False
                entry.future.cancel()
            if left:
                self._pending = [e for e in self._pending if e.queued]
                self._cond.notify_all()
            return bool(left)

    # -- the batcher thread -----------------------------------------------------------
    def _take(self) -> list[_Entry[ItemT, ResultT]] | None:
        with self._cond:
            while True:
                while not self._pending:
                    if self._stopping:
                        return None
                    self._cond.wait(0.5)
                first = self._pending[0]
                batch = [first] if first.alone else self._gather(first)
                if batch is None:
                    continue  # the head left the queue while its batch formed
                for entry in batch:
                    entry.queued = False
                self._pending = [e for e in self._pending if e.queued]
                return batch

    def _gather(self, first: _Entry[ItemT, ResultT]) -> list[_Entry[ItemT, ResultT]] | None:
        # Wait for company only as long as the oldest item may wait, and only while
        # announced jobs may still bring some.
        deadline = first.enqueued_at + self.max_wait_s
        while True:
            batch = self._compatible(first)
            full = sum(e.cost for e in batch) >= self._limit(first.key)
            remaining = deadline - time.monotonic()
            if full or remaining <= 0 or self._stopping or self._incoming <= 0:
                return batch
            self._cond.wait(remaining)
            if not first.queued:
                return None

    def _compatible(self, first: _Entry[ItemT, ResultT]) -> list[_Entry[ItemT, ResultT]]:
        """The head and, in queue order, every waiting item of its key that still fits."""
        batch, cost, limit = [first], first.cost, self._limit(first.key)
        for entry in self._pending[1:]:
            if not entry.alone and entry.key == first.key and cost + entry.cost <= limit:
                batch.append(entry)
                cost += entry.cost
        return batch

    def _limit(self, key: Hashable | None) -> int:
        size, until = self._backoff.get(key, (self.max_batch, 0))
        return min(size, self.max_batch) if self.batches_run < until else self.max_batch

    def _requeue(self, entries: list[_Entry[ItemT, ResultT]]) -> None:
        with self._cond:
            for entry in entries:
                entry.queued = True
            self._pending[0:0] = entries
            self._cond.notify_all()

    def _retune_if_idle(self) -> None:
        """Measure the batch size again when the autobatch asks, but only while no job
        waits or is on its way: the probes hold the model thread."""
        autobatch = self.autobatch
        if autobatch is None or not autobatch.due():
            return
        with self._cond:
            if self._pending or self._incoming > 0 or self._stopping:
                return
        try:
            size = autobatch.tune()
        except Exception as exc:  # keep serving at the size it has
            log.warning("batch size not measured again: %s", exc)
            autobatch.postpone()
            return
        with self._cond:
            self.max_batch = size

    def _loop(self) -> None:
        while True:
            self._retune_if_idle()
            batch = self._take()
            if batch is None:
                return
            live = self._still_wanted(batch)
            try:
                if live:
                    self._call(live)
            except BaseException as exc:  # never leave a job thread waiting forever
                for entry in live:
                    if not entry.future.done():
                        entry.future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise

    def _still_wanted(self, batch: list[_Entry[ItemT, ResultT]]) -> list[_Entry[ItemT, ResultT]]:
        """Drop, without model work, the items of jobs that are gone or stopped."""
        reasons: dict[_Job[ItemT, ResultT], BaseException | None] = {}
        live = []
        for entry in batch:
            job = entry.job
            if job.gone:
                entry.future.cancel()
                continue
            if job not in reasons:
                reasons[job] = _stop_reason(job.check)
            reason = reasons[job]
            if reason is None:
                live.append(entry)
            else:
                entry.future.set_exception(reason)
        return live

    def _call(self, batch: list[_Entry[ItemT, ResultT]]) -> None:
        started = time.monotonic()
        try:
            results = self.model.predict([entry.item for entry in batch])
        except BatchInterrupted as stop:
            # One item's own stop (cancel, timeout): the others produced nothing, and the
            # time went on the item that stopped it.
            batch[stop.index].job.charge(time.monotonic() - started)
            batch[stop.index].future.set_exception(stop.error)
            self._requeue([e for i, e in enumerate(batch) if i != stop.index])
            return
        except OutOfMemory as exc:
            if len(batch) == 1:
                batch[0].job.charge(time.monotonic() - started)
                batch[0].future.set_exception(exc)
                return
            # Split this batch, and back off for its key only for a while (RECOVER_AFTER):
            # neither the tuned size nor a later measurement is lowered for good. Only
            # keys that failed within the last RECOVER_AFTER calls are kept.
            cost = sum(entry.cost for entry in batch)
            half = max(1, cost // 2)
            now = self.batches_run
            self._backoff = {k: b for k, b in self._backoff.items() if b[1] > now}
            self._backoff[batch[0].key] = (half, now + self.recover_after)
            log.warning("out of memory at batch %d; retrying at %d", cost, half)
            self._requeue(batch)
            return
        except Exception as exc:
            if len(batch) == 1:
                batch[0].job.charge(time.monotonic() - started)
                batch[0].future.set_exception(exc)
                return
            # One item's trouble must not fail the others: each runs alone next.
            for entry in batch:
                entry.solo = True
            self._requeue(batch)
            return
        self.batches_run += 1
        elapsed = time.monotonic() - started
        size = sum(entry.cost for entry in batch)
        if self.autobatch is not None:
            self.autobatch.observe(size, elapsed)
        for entry, result in zip(batch, results, strict=True):
            # Split by cost (images), so each job pays for what it put in the call.
            share = elapsed * entry.cost / size if size else elapsed / len(batch)
            entry.job.charge(share)
            entry.future.set_result(Ran(result, size, len(batch), elapsed, share))


def _stop_reason(check: Callable[[], None]) -> BaseException | None:
    try:
        check()
    except Exception as exc:
        return exc
    return None
