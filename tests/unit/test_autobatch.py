"""The batch size measured at warm-up and again on drift (workers/runtime/autobatch.py)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import pytest

from api_client.errors import OutOfMemory
from api_client.settings import Settings
from workers.runtime import autobatch
from workers.runtime.autobatch import AutoBatch, enabled, measure, sizes_up_to
from workers.runtime.batching import Batcher
from workers.testing.services import wait_until


class FakeDevice:
    """A model whose batch of n takes ``cost(n)`` seconds of a fake clock."""

    def __init__(self, per_image: dict[int, float], oom_at: int | None = None) -> None:
        self.per_image = per_image
        self.oom_at = oom_at
        self.now = 0.0
        self.runs: list[int] = []

    def clock(self) -> float:
        return self.now

    def run(self, n: int) -> None:
        self.runs.append(n)
        if self.oom_at is not None and n >= self.oom_at:
            raise OutOfMemory(f"batch {n}")
        self.now += n * self.per_image[n]


def test_sizes_double_up_to_the_limit() -> None:
    assert sizes_up_to(1) == [1]
    assert sizes_up_to(8) == [1, 2, 4, 8]
    assert sizes_up_to(12) == [1, 2, 4, 8, 12]


def test_the_knee_of_a_cpu_curve_is_chosen_and_the_climb_stops_past_it() -> None:
    # Per image: batching helps up to 8, then the cache runs out (this CPU's BLIP-base).
    device = FakeDevice({1: 2.0, 2: 1.6, 4: 1.4, 8: 1.3, 16: 1.7, 32: 1.8})
    tuning = measure(device.run, sizes_up_to(32), budget_s=1e9, warm_each=False, clock=device.clock)
    assert tuning.size == 8
    assert device.runs == [1, 2, 4, 8, 16]  # 16 is past the knee: 32 is never tried
    assert "knee" in tuning.stopped


def test_a_gpu_curve_climbs_to_the_limit_and_ties_go_to_the_smaller_size() -> None:
    device = FakeDevice({1: 1.0, 2: 0.5, 4: 0.25, 8: 0.125, 16: 0.1, 32: 0.099})
    tuning = measure(device.run, sizes_up_to(32), budget_s=1e9, warm_each=True, clock=device.clock)
    # 32 is within TIE of 16: the smaller batch has lower latency and spare memory.
    assert tuning.size == 16
    assert device.runs == [1, 1, 2, 2, 4, 4, 8, 8, 16, 16, 32, 32]  # each size warmed once


def test_out_of_memory_ends_the_climb_at_the_last_size_that_fit() -> None:
    device = FakeDevice({1: 1.0, 2: 0.5, 4: 0.3, 8: 0.2}, oom_at=8)
    tuning = measure(device.run, sizes_up_to(64), budget_s=1e9, warm_each=False, clock=device.clock)
    assert tuning.size == 4
    assert tuning.stopped == "out of memory at 8"


def test_the_time_budget_stops_before_a_probe_that_would_overrun_it() -> None:
    device = FakeDevice({1: 2.0, 2: 1.5, 4: 1.2, 8: 1.0})
    # 1 + 2 images cost 5 s; the probe of 4 would take about 6 s more.
    tuning = measure(device.run, sizes_up_to(8), budget_s=8, warm_each=False, clock=device.clock)
    assert device.runs == [1, 2]
    assert tuning.size == 2
    assert "budget" in tuning.stopped


def test_tuning_is_on_unless_the_user_set_the_batch_size() -> None:
    assert enabled(Settings.from_env({}))
    assert not enabled(Settings.from_env({"IMAGEQ_MAX_BATCH_IMAGES": "32"}))
    assert not enabled(Settings.from_env({"IMAGEQ_BATCH_TUNING": "0"}))
    # An override in code is the user's choice as well, and survives a copy.
    assert not enabled(Settings.from_env({}, max_batch_images=8).with_(device="cpu"))
    assert enabled(Settings.from_env({}).with_(device="cpu"))


def test_for_worker_serves_a_set_size_untouched() -> None:
    def never(n: int) -> None:
        raise AssertionError("nothing is measured when the user chose the size")

    settings = Settings.from_env({"IMAGEQ_MAX_BATCH_IMAGES": "12"})
    assert autobatch.for_worker(settings, "cpu", never) == (12, None)


def test_drift_from_the_rate_after_tuning_asks_for_a_new_measurement() -> None:
    now = [0.0]
    auto = AutoBatch(
        lambda n: None, limit=8, budget_s=1, warm_each=False, window=5, clock=lambda: now[0]
    )
    auto.size = 8
    for _ in range(5):
        auto.observe(8, 1.0)  # the baseline: 8 images/s
    for _ in range(20):
        auto.observe(4, 10.0)  # part-empty calls say nothing about the device
    assert not auto.due()
    for _ in range(20):
        auto.observe(8, 2.0)  # half the rate, but too soon after tuning
    assert not auto.due()
    now[0] = 601.0
    auto.observe(8, 2.0)
    assert auto.due()


class Model:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def batch_key(self, item: int) -> Hashable:
        return 0

    def predict(self, batch: Sequence[int]) -> list[int]:
        self.calls.append(len(batch))
        return list(batch)


def test_the_batcher_measures_again_only_with_nothing_waiting() -> None:
    model = Model()
    probes: list[int] = []
    auto = AutoBatch(probes.append, limit=4, budget_s=60, warm_each=False)
    batcher: Batcher[int, int] = Batcher(model, max_batch=2, max_wait_ms=0, autobatch=auto)
    auto._due = True  # drift seen
    batcher.start()
    try:
        assert [r.result for r in batcher.run([1, 2, 3])] == [1, 2, 3]
        # Done once the batcher serves with the new size (set after the probes ran).
        wait_until(
            lambda: auto.last is not None and batcher.max_batch == auto.size,
            5,
            "the new measurement in service",
        )
        assert probes[:3] == [1, 2, 4]
        assert batcher.max_batch == auto.size
        assert not auto.due()
    finally:
        batcher.stop()


def test_a_failed_measurement_keeps_the_batcher_serving() -> None:
    def broken(n: int) -> None:
        raise RuntimeError("device busy")

    auto = AutoBatch(broken, limit=4, budget_s=60, warm_each=False)
    auto._due = True
    batcher: Batcher[int, int] = Batcher(Model(), max_batch=2, max_wait_ms=0, autobatch=auto)
    batcher.start()
    try:
        assert [r.result for r in batcher.run([5])] == [5]
        assert [r.result for r in batcher.run([6, 7])] == [6, 7]
        assert batcher.max_batch == 2
        assert not auto.due()  # postponed, not tried again at every call
    finally:
        batcher.stop()


@pytest.mark.parametrize("limit", [1, 3])
def test_small_limits_are_probed_whole(limit: int) -> None:
    device = FakeDevice({1: 1.0, 2: 0.6, 3: 0.5})
    tuning = measure(
        device.run, sizes_up_to(limit), budget_s=1e9, warm_each=False, clock=device.clock
    )
    assert tuning.size == limit
