"""The micro-batcher with a fake predictor: grouping, isolation, OOM split, cancel."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Sequence
from typing import Any

import pytest

from api_client.errors import Canceled, ModelError, OutOfMemory
from workers.runtime.batching import Batcher


class Recorder:
    model_id = "fake"

    def __init__(self, oom_above: int = 0, bad: Any = None) -> None:
        self.batches: list[list[Any]] = []
        self.oom_above = oom_above
        self.bad = bad
        self.lock = threading.Lock()

    def setup(self, device: str) -> None:
        return

    def batch_key(self, item: Any) -> Hashable:
        return item[0]

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        if self.oom_above and len(batch) > self.oom_above:
            raise OutOfMemory("simulated CUDA OOM")
        if self.bad is not None and any(item == self.bad for item in batch):
            raise ModelError("bad item")
        with self.lock:
            self.batches.append(list(batch))
        return [f"{k}:{v}" for k, v in batch]


def _run_jobs(batcher: Batcher, jobs: list[list[Any]]) -> list[Any]:
    results: list[Any] = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def one(i: int) -> None:
        with batcher.incoming() as ticket:
            barrier.wait()
            # Stagger the arrivals: the batch must still wait for every announced job.
            time.sleep(0.01 * i)
            try:
                results[i] = batcher.run(jobs[i], ticket=ticket)
            except Exception as exc:
                results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_jobs_arriving_together_share_a_batch_and_keys_stay_apart() -> None:
    pred = Recorder()
    batcher = Batcher(pred, max_batch=16, max_wait_ms=200)
    batcher.start()
    try:
        jobs = [[("a", i)] for i in range(6)] + [[("b", 9), ("b", 10)]]
        results = _run_jobs(batcher, jobs)
    finally:
        batcher.stop()
    assert [r[0] for r in results[:6]] == [[f"a:{i}"] for i in range(6)]
    assert results[6][0] == ["b:9", "b:10"]
    assert all(len({k for k, _ in b}) == 1 for b in pred.batches)
    assert max(len(b) for b in pred.batches if b[0][0] == "a") == 6
    assert results[0][1] == 6


def test_large_job_is_split_at_max_batch() -> None:
    pred = Recorder()
    batcher = Batcher(pred, max_batch=4, max_wait_ms=5)
    batcher.start()
    try:
        out, size = batcher.run([("a", i) for i in range(10)])
    finally:
        batcher.stop()
    assert out == [f"a:{i}" for i in range(10)]
    assert size == 4
    assert [len(b) for b in pred.batches] == [4, 4, 2]


def test_one_bad_item_fails_only_its_job() -> None:
    pred = Recorder(bad=("a", 3))
    batcher = Batcher(pred, max_batch=16, max_wait_ms=200)
    batcher.start()
    try:
        results = _run_jobs(batcher, [[("a", i)] for i in range(5)])
    finally:
        batcher.stop()
    assert isinstance(results[3], ModelError)
    assert [r[0] for i, r in enumerate(results) if i != 3] == [["a:0"], ["a:1"], ["a:2"], ["a:4"]]


def test_out_of_memory_splits_the_batch_and_remembers_the_limit() -> None:
    pred = Recorder(oom_above=2)
    batcher = Batcher(pred, max_batch=8, max_wait_ms=5)
    batcher.start()
    try:
        out, _ = batcher.run([("a", i) for i in range(8)])
        assert out == [f"a:{i}" for i in range(8)]
        assert batcher.max_batch == 2
        pred.batches.clear()
        batcher.run([("a", i) for i in range(4)])
    finally:
        batcher.stop()
    assert [len(b) for b in pred.batches] == [2, 2]


def test_canceled_job_is_dropped_before_its_batch_runs() -> None:
    pred = Recorder()
    batcher = Batcher(pred, max_batch=8, max_wait_ms=5)
    batcher.start()
    try:
        with pytest.raises(Canceled):
            batcher.run([("a", 1)], is_canceled=lambda: True)
    finally:
        batcher.stop()
    assert pred.batches == []


def test_a_lone_job_does_not_wait_for_company() -> None:
    pred = Recorder()
    batcher = Batcher(pred, max_batch=8, max_wait_ms=2000)
    batcher.start()
    try:
        began = time.monotonic()
        with batcher.incoming() as ticket:
            out, size = batcher.run([("a", 1)], ticket=ticket)
        elapsed = time.monotonic() - began
    finally:
        batcher.stop()
    assert out == ["a:1"] and size == 1
    assert elapsed < 1.0  # far below max_wait: nobody else was on the way
