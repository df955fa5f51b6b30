"""The micro-batcher with a fake predictor: grouping, isolation, OOM split, cancel."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Sequence
from typing import Any

import pytest

from imageq.api_client.errors import Canceled, ModelError, OutOfMemory
from imageq.workers.runtime.autobatch import AutoBatch
from imageq.workers.runtime.batching import Batcher, Ran


class Recorder:
    model_id = "fake"

    def __init__(self, oom_above: int = 0, bad: Any = None) -> None:
        self.batches: list[list[Any]] = []
        self.oom_above = oom_above
        self.bad = bad
        self.lock = threading.Lock()
        self.hold = threading.Event()
        self.hold.set()

    def setup(self, device: str) -> None:
        return

    def batch_key(self, item: Any) -> Hashable:
        return item[0]

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        assert self.hold.wait(10)
        if self.oom_above and len(batch) > self.oom_above:
            raise OutOfMemory("simulated CUDA OOM")
        if self.bad is not None and any(item == self.bad for item in batch):
            raise ModelError("bad item")
        with self.lock:
            self.batches.append(list(batch))
        return [f"{k}:{v}" for k, v in batch]


def results(ran: list[Ran[Any]]) -> list[Any]:
    return [r.result for r in ran]


def largest(ran: list[Ran[Any]]) -> int:
    return max(r.batch_size for r in ran)


def _run_jobs(batcher: Batcher[Any, Any], jobs: list[list[Any]]) -> list[Any]:
    done: list[Any] = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def one(i: int) -> None:
        with batcher.incoming() as ticket:
            barrier.wait()
            # Stagger the arrivals: the batch must still wait for every announced job.
            time.sleep(0.01 * i)
            try:
                done[i] = batcher.run(jobs[i], ticket=ticket)
            except Exception as exc:
                done[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return done


def canceled() -> None:
    raise Canceled("canceled by the test")


def test_jobs_arriving_together_share_a_batch_and_keys_stay_apart() -> None:
    pred = Recorder()
    batcher = Batcher(pred, max_batch=16, max_wait_ms=200)
    batcher.start()
    try:
        jobs = [[("a", i)] for i in range(6)] + [[("b", 9), ("b", 10)]]
        done = _run_jobs(batcher, jobs)
    finally:
        batcher.stop()
    assert [results(r) for r in done[:6]] == [[f"a:{i}"] for i in range(6)]
    assert results(done[6]) == ["b:9", "b:10"]
    assert all(len({k for k, _ in b}) == 1 for b in pred.batches)
    assert max(len(b) for b in pred.batches if b[0][0] == "a") == 6
    assert largest(done[0]) == 6


def test_large_job_is_split_at_max_batch() -> None:
    pred = Recorder()
    batcher = Batcher(pred, max_batch=4, max_wait_ms=5)
    batcher.start()
    try:
        ran = batcher.run([("a", i) for i in range(10)])
    finally:
        batcher.stop()
    assert results(ran) == [f"a:{i}" for i in range(10)]
    assert largest(ran) == 4
    assert [len(b) for b in pred.batches] == [4, 4, 2]


def test_item_costs_fill_the_batch() -> None:
    pred = Recorder()
    batcher = Batcher(pred, max_batch=4, max_wait_ms=5, cost=lambda item: item[1])
    batcher.start()
    try:
        ran = batcher.run([("a", 3), ("a", 2), ("a", 1), ("a", 5)])
    finally:
        batcher.stop()
    # 3 + 2 is over 4, so 2 waits; an item over the limit runs alone.
    assert pred.batches == [[("a", 3), ("a", 1)], [("a", 2)], [("a", 5)]]
    assert [(r.batch_size, r.batch_items) for r in ran] == [(4, 2), (2, 1), (4, 2), (5, 1)]


def test_one_bad_item_fails_only_its_job() -> None:
    pred = Recorder(bad=("a", 3))
    batcher = Batcher(pred, max_batch=16, max_wait_ms=200)
    batcher.start()
    try:
        done = _run_jobs(batcher, [[("a", i)] for i in range(5)])
    finally:
        batcher.stop()
    assert isinstance(done[3], ModelError)
    assert [results(r) for i, r in enumerate(done) if i != 3] == [
        ["a:0"],
        ["a:1"],
        ["a:2"],
        ["a:4"],
    ]
    # The others reran alone after their shared batch failed.
    assert all(largest(r) == 1 for i, r in enumerate(done) if i != 3)


class Heavy(Recorder):
    """Items keyed "heavy" (a caption with many beams, say) run out of memory when more
    than ``fits`` of them share a call; other items never do."""

    def __init__(self, fits: int) -> None:
        super().__init__()
        self.fits = fits

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        if sum(1 for k, _ in batch if k == "heavy") > self.fits:
            raise OutOfMemory("simulated CUDA OOM")
        return super().predict(batch)


def test_out_of_memory_splits_the_heavy_batch_and_other_keys_keep_the_full_size() -> None:
    pred = Heavy(fits=2)
    auto = AutoBatch(lambda n: None, limit=256, budget_s=1, warm_each=False)
    batcher = Batcher(pred, max_batch=8, max_wait_ms=5, autobatch=auto)
    batcher.start()
    try:
        ran = batcher.run([("heavy", i) for i in range(8)])
        # Out of memory at 8, then at 4: the heavy job still completes, two at a time.
        assert results(ran) == [f"heavy:{i}" for i in range(8)]
        assert [len(b) for b in pred.batches] == [2, 2, 2, 2]
        pred.batches.clear()
        ordinary = batcher.run([("a", i) for i in range(8)])
    finally:
        batcher.stop()
    assert results(ordinary) == [f"a:{i}" for i in range(8)]
    assert [len(b) for b in pred.batches] == [8]
    # One heavy batch is no reason to probe lower sizes only at the next measurement.
    assert (batcher.max_batch, auto.limit) == (8, 256)


def test_the_size_lowered_by_out_of_memory_recovers_after_successful_calls() -> None:
    pred = Recorder(oom_above=2)  # one key, as for match: the whole worker backs off
    batcher = Batcher(pred, max_batch=8, max_wait_ms=5, recover_after=6)
    batcher.start()
    try:
        ran = batcher.run([("a", i) for i in range(8)])
        assert results(ran) == [f"a:{i}" for i in range(8)]
        pred.oom_above = 0  # the heavy traffic has passed
        pred.batches.clear()
        # Four calls of 2 so far; two more still at 2, then the full size again.
        batcher.run([("a", i) for i in range(4)])
        batcher.run([("a", i) for i in range(8)])
    finally:
        batcher.stop()
    assert [len(b) for b in pred.batches] == [2, 2, 8]


def test_a_lone_item_out_of_memory_fails_its_job() -> None:
    pred = Heavy(fits=0)
    batcher = Batcher(pred, max_batch=8, max_wait_ms=5)
    batcher.start()
    try:
        with pytest.raises(OutOfMemory):
            batcher.run([("heavy", 0), ("heavy", 1)])
        assert results(batcher.run([("a", 0), ("a", 1)])) == ["a:0", "a:1"]
    finally:
        batcher.stop()
    assert [len(b) for b in pred.batches] == [2]


def test_canceled_job_is_dropped_before_its_batch_runs() -> None:
    pred = Recorder()
    batcher = Batcher(pred, max_batch=8, max_wait_ms=5)
    batcher.start()
    try:
        with pytest.raises(Canceled):
            batcher.run([("a", 1)], check=canceled)
    finally:
        batcher.stop()
    assert pred.batches == []


def test_a_job_stopped_while_waiting_leaves_the_queue_at_once() -> None:
    pred = Recorder()
    pred.hold.clear()  # the first batch holds the model while the second job waits
    batcher = Batcher(pred, max_batch=2, max_wait_ms=5, poll_s=0.02)
    batcher.start()
    stop = threading.Event()

    def check() -> None:
        if stop.is_set():
            raise Canceled("canceled by the test")

    try:
        first = batcher.submit([("a", 0), ("a", 1)])
        failed: list[BaseException] = []

        def waiting() -> None:
            try:
                batcher.run([("a", i) for i in range(2, 6)], check=check)
            except BaseException as exc:
                failed.append(exc)

        thread = threading.Thread(target=waiting)
        thread.start()
        while len(batcher._pending) < 4:
            time.sleep(0.005)
        stop.set()
        thread.join(2)  # while the model is still held
        assert not thread.is_alive() and isinstance(failed[0], Canceled)
        assert batcher._pending == []
        pred.hold.set()
        assert [f.result(5).result for f in first] == ["a:0", "a:1"]
    finally:
        pred.hold.set()
        batcher.stop()
    assert pred.batches == [[("a", 0), ("a", 1)]]


def test_a_lone_job_does_not_wait_for_company() -> None:
    pred = Recorder()
    batcher = Batcher(pred, max_batch=8, max_wait_ms=2000)
    batcher.start()
    try:
        began = time.monotonic()
        with batcher.incoming() as ticket:
            ran = batcher.run([("a", 1)], ticket=ticket)
        elapsed = time.monotonic() - began
    finally:
        batcher.stop()
    assert results(ran) == ["a:1"] and largest(ran) == 1
    assert elapsed < 1.0  # far below max_wait: nobody else was on the way


def test_progress_follows_the_items_and_can_stop_the_job() -> None:
    pred = Recorder()
    batcher = Batcher(pred, max_batch=2, max_wait_ms=0)
    batcher.start()
    try:
        seen: list[tuple[int, int]] = []
        ran = batcher.run(
            [("a", i) for i in range(5)], on_item_done=lambda d, t: seen.append((d, t))
        )
        assert results(ran) == [f"a:{i}" for i in range(5)]
        assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]

        # A cancel seen by the progress callback ends the job; its waiting items leave.
        class Slow(Recorder):
            def predict(self, batch: Sequence[Any]) -> list[Any]:
                time.sleep(0.2)
                return super().predict(batch)

        slow = Slow()
        slow_batcher = Batcher(slow, max_batch=2, max_wait_ms=0)
        slow_batcher.start()

        def stop(done: int, total: int) -> None:
            raise Canceled("canceled while its images ran")

        try:
            with pytest.raises(Canceled):
                slow_batcher.run([("b", i) for i in range(8)], on_item_done=stop)
            time.sleep(0.6)
        finally:
            slow_batcher.stop()
        # The first batch, and at most the one already in the model: never all four.
        assert sum(len(b) for b in slow.batches) <= 4
    finally:
        batcher.stop()


def test_jobs_sharing_a_call_are_charged_shares_that_add_up_to_it() -> None:
    """Usage: each job pays for its items' part of every call they were in, by cost."""

    class Slow(Recorder):
        def predict(self, batch: Sequence[Any]) -> list[Any]:
            time.sleep(0.05)
            return super().predict(batch)

    batcher: Batcher[Any, Any] = Batcher(
        Slow(), max_batch=16, max_wait_ms=2000, cost=lambda item: int(item[1])
    )
    batcher.start()
    charged: dict[int, list[float]] = {0: [], 1: [], 2: []}
    jobs = [[("k", 1)], [("k", 2), ("k", 1)], [("k", 4)]]
    ran: list[list[Ran[Any]]] = [[], [], []]
    barrier = threading.Barrier(3)

    def one(i: int) -> None:
        with batcher.incoming() as ticket:
            barrier.wait()
            ran[i] = batcher.run(jobs[i], ticket=ticket, charge=charged[i].append)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    batcher.stop()
    (call,) = {r.run_s for job in ran for r in job}  # one call held every item
    totals = [sum(charged[i]) for i in range(3)]
    assert sum(totals) == pytest.approx(call, rel=1e-9)
    # By cost: 1, 3 and 4 images of 8.
    assert totals == pytest.approx([call / 8, call * 3 / 8, call / 2], rel=1e-9)
    assert [r.share_s for r in ran[1]] == pytest.approx([call * 2 / 8, call / 8])


def test_a_job_stopped_inside_its_call_is_charged_the_call() -> None:
    from imageq.workers.predictors.base import BatchInterrupted

    class Stops(Recorder):
        def predict(self, batch: Sequence[Any]) -> list[Any]:
            time.sleep(0.02)
            raise BatchInterrupted(0, Canceled("canceled while running"))

    batcher: Batcher[Any, Any] = Batcher(Stops(), max_batch=1, max_wait_ms=0)
    batcher.start()
    charged: list[float] = []
    with pytest.raises(Canceled):
        batcher.run([("k", 1)], charge=charged.append)
    batcher.stop()
    assert len(charged) == 1 and charged[0] >= 0.02
