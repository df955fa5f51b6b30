"""The diffusion worker's batcher: one pipeline thread, batching of waiting generate jobs,
failures per job.

A scripted predictor stands in for the pipeline, so each case can stage exactly the
arrival order, cancel or failure it is about (the real pipeline runs in
tests/e2e/test_diffusion.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
from PIL import Image

from imageq.api_client.errors import Canceled, ImageqError, ModelError, OutOfMemory
from imageq.api_client.inputs import GenerateInput
from imageq.workers.kinds.diffusion import AloneCall, DiffusionBatcher, pipeline_batcher
from imageq.workers.predictors.base import BatchInterrupted, StepCallback
from imageq.workers.predictors.diffusion import GeneratedImage, GenerateJob
from imageq.workers.runtime.batching import Ran

PIXELS = Image.new("RGB", (64, 64))


class Control:
    """JobControl's interface: a step callback that can be told to stop the job."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.canceled = False
        self.steps: list[int] = []
        self.metrics: dict[str, Any] = {}

    def check(self) -> None:
        if self.canceled:
            raise Canceled("canceled by the test")

    def __call__(self, step: int, total: int, extra: dict[str, Any] | None = None) -> None:
        self.steps.append(step)
        if self.stop_at is not None and step >= self.stop_at:
            self.canceled = True
        self.check()


class Scripted:
    """Records each pipeline call's seeds; raises what ``failures`` lists, in order."""

    def __init__(self) -> None:
        self.calls: list[list[int | None]] = []
        self.failures: list[Exception] = []

    def batch_key(self, job: GenerateJob) -> Any:
        return (job.inp.width, job.inp.height, job.inp.steps)

    def predict(self, jobs: Sequence[GenerateJob]) -> list[list[GeneratedImage]]:
        inps = [job.inp for job in jobs]
        return self._run(inps, [job.on_step for job in jobs], batched=len(jobs) > 1)

    def _run(
        self, inps: Sequence[GenerateInput], on_steps: Sequence[StepCallback], batched: bool
    ) -> list[list[GeneratedImage]]:
        self.calls.append([inp.seed for inp in inps])
        if self.failures:
            raise self.failures.pop(0)
        for step in range(1, inps[0].steps + 1):
            for index, on_step in enumerate(on_steps):
                try:
                    on_step(step, inps[0].steps, {})
                except Exception as exc:
                    raise BatchInterrupted(index, exc) if batched else exc from None
        return [
            [GeneratedImage(PIXELS, (inp.seed or 0) + i) for i in range(inp.num_images)]
            for inp in inps
        ]


def gen(seed: int, **kw: Any) -> GenerateInput:
    return GenerateInput(
        **{"prompt": "a cat", "width": 64, "height": 64, "steps": 2, **kw}, seed=seed
    )


@pytest.fixture
def predictor() -> Scripted:
    return Scripted()


@pytest.fixture
def queue(predictor: Scripted) -> Iterator[DiffusionBatcher]:
    q = pipeline_batcher(predictor, max_batch_images=4, max_wait_ms=0)
    q.start()
    yield q
    q.stop(5)


def generate(queue: DiffusionBatcher, inp: GenerateInput, control: Control) -> Ran[Any]:
    """What DiffusionHandler does with a generate job."""
    return queue.run([GenerateJob(inp, control)], control.check)[0]


def call(
    queue: DiffusionBatcher, run: Callable[[], list[GeneratedImage]], control: Control
) -> Ran[Any]:
    """What DiffusionHandler does with an inpaint or style job."""
    return queue.run([AloneCall(run, images=0)], control.check)[0]


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(8) as executor:
        yield executor


class Gate:
    """Holds the pipeline thread in a call until opened, so that jobs pile up behind it."""

    def __init__(self, queue: DiffusionBatcher, pool: ThreadPoolExecutor) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()
        self.future = pool.submit(call, queue, self._hold, Control())
        assert self.entered.wait(5)

    def _hold(self) -> list[GeneratedImage]:
        self.entered.set()
        assert self.opened.wait(10)
        return []

    def open(self) -> None:
        self.opened.set()
        self.future.result(5)


def submit(
    queue: DiffusionBatcher, pool: ThreadPoolExecutor, inp: GenerateInput, control: Control
) -> Future[Ran[Any]]:
    waiting = len(queue._pending)
    future = pool.submit(generate, queue, inp, control)
    wait_for(lambda: len(queue._pending) > waiting)
    return future


def wait_for(check: Callable[[], bool], timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_waiting_compatible_jobs_share_one_call(
    queue: DiffusionBatcher, predictor: Scripted, pool: ThreadPoolExecutor
) -> None:
    gate = Gate(queue, pool)
    a = submit(queue, pool, gen(1, num_images=2), Control())
    other = submit(queue, pool, gen(2, steps=3), Control())
    b = submit(queue, pool, gen(3), Control())
    too_many = submit(queue, pool, gen(4, num_images=2), Control())  # 2 + 1 + 2 > 4 images
    gate.open()
    results = [f.result(5) for f in (a, other, b, too_many)]
    assert predictor.calls == [[1, 3], [2], [4]]
    assert [(r.batch_items, r.batch_size) for r in results] == [(2, 3), (1, 1), (2, 3), (1, 2)]
    assert [im.seed for im in results[0].result] == [1, 2]
    assert [im.seed for im in results[2].result] == [3]


def test_a_job_canceled_in_a_batch_ends_alone_and_the_others_run_again(
    queue: DiffusionBatcher, predictor: Scripted, pool: ThreadPoolExecutor
) -> None:
    gate = Gate(queue, pool)
    a = submit(queue, pool, gen(1), Control())
    stopping = Control(stop_at=2)
    b = submit(queue, pool, gen(2), stopping)
    gate.open()
    with pytest.raises(Canceled):
        b.result(5)
    assert stopping.steps == [1, 2]
    assert [im.seed for im in a.result(5).result] == [1]
    assert predictor.calls == [[1, 2], [1]]


def test_a_job_canceled_while_waiting_leaves_at_once(
    queue: DiffusionBatcher, predictor: Scripted, pool: ThreadPoolExecutor
) -> None:
    gate = Gate(queue, pool)
    control = Control()
    waiting = submit(queue, pool, gen(1), control)
    control.canceled = True
    with pytest.raises(Canceled):
        waiting.result(2)  # while the gate still holds the pipeline
    assert queue._pending == []
    gate.open()
    assert generate(queue, gen(2), Control()).result[0].seed == 2
    assert predictor.calls == [[2]]


def test_out_of_memory_in_a_batch_halves_it_and_a_lone_job_fails_alone(
    queue: DiffusionBatcher, predictor: Scripted, pool: ThreadPoolExecutor
) -> None:
    gate = Gate(queue, pool)
    jobs = [submit(queue, pool, gen(seed), Control()) for seed in (1, 2, 3, 4)]
    predictor.failures = [OutOfMemory("batch of 4")]
    gate.open()
    assert [f.result(5).result[0].seed for f in jobs] == [1, 2, 3, 4]
    assert predictor.calls == [[1, 2, 3, 4], [1, 2], [3, 4]]
    assert queue.max_batch == 4  # halved for this key for a while, not for good
    predictor.failures = [OutOfMemory("the GPU ran out of memory")]
    with pytest.raises(OutOfMemory):
        generate(queue, gen(5), Control())
    # The worker keeps serving.
    assert generate(queue, gen(6), Control()).result[0].seed == 6


def test_a_failed_batch_runs_each_job_alone(
    queue: DiffusionBatcher, predictor: Scripted, pool: ThreadPoolExecutor
) -> None:
    gate = Gate(queue, pool)
    a = submit(queue, pool, gen(1), Control())
    b = submit(queue, pool, gen(2), Control())
    predictor.failures = [ModelError("batch"), ModelError("only job 1")]
    gate.open()
    with pytest.raises(ModelError, match="only job 1"):
        a.result(5)
    assert b.result(5).result[0].seed == 2
    assert predictor.calls == [[1, 2], [1], [2]]


def test_calls_fail_alone_and_stop_refuses_new_work(queue: DiffusionBatcher) -> None:
    def boom() -> list[GeneratedImage]:
        raise ModelError("inpaint failed")

    with pytest.raises(ModelError, match="inpaint failed"):
        call(queue, boom, Control())
    assert call(queue, lambda: [], Control()).batch_items == 1
    queue.stop(5)
    with pytest.raises(ImageqError, match="shutting down"):
        call(queue, lambda: [], Control())
