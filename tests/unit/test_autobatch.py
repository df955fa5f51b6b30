"""The batch size measured at warm-up and again on drift (workers/runtime/autobatch.py)."""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence

import pytest

from imageq.api_client.errors import OutOfMemory
from imageq.api_client.settings import Settings
from imageq.workers.runtime import autobatch
from imageq.workers.runtime.autobatch import REPEATS, AutoBatch, enabled, measure, sizes_up_to
from imageq.workers.runtime.batching import Batcher
from imageq.workers.testing.services import wait_until


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


class NoisyDevice(FakeDevice):
    """Each pass takes its size's time per image, off by up to ``noise`` either way (a
    shared 2-core machine: another process, the scheduler, caches)."""

    def __init__(self, per_image: dict[int, float], noise: float, seed: int) -> None:
        super().__init__(per_image)
        self.noise = noise
        self.rng = random.Random(seed)

    def run(self, n: int) -> None:
        self.runs.append(n)
        self.now += n * self.per_image[n] * (1 + self.rng.uniform(-self.noise, self.noise))


class Scripted(FakeDevice):
    """Passes of a size take the seconds per image listed for it, in turn."""

    def __init__(self, per_image: dict[int, list[float]]) -> None:
        super().__init__({})
        self.script = {n: iter(times) for n, times in per_image.items()}

    def run(self, n: int) -> None:
        self.runs.append(n)
        self.now += n * next(self.script[n])


def each(sizes: list[int], times: int = REPEATS) -> list[int]:
    return [size for size in sizes for _ in range(times)]


def test_sizes_double_up_to_the_limit() -> None:
    assert sizes_up_to(1) == [1]
    assert sizes_up_to(8) == [1, 2, 4, 8]
    assert sizes_up_to(12) == [1, 2, 4, 8, 12]


def test_the_knee_of_a_cpu_curve_is_chosen_and_the_climb_stops_past_it() -> None:
    # Per image: batching helps up to 8, then the cache runs out (this CPU's BLIP-base).
    device = FakeDevice({1: 2.0, 2: 1.6, 4: 1.4, 8: 1.3, 16: 1.7, 32: 1.8})
    tuning = measure(device.run, sizes_up_to(32), budget_s=1e9, warm_each=False, clock=device.clock)
    assert tuning.size == 8
    assert device.runs == each([1, 2, 4, 8, 16])  # 16 is past the knee: 32 is never tried
    assert "knee" in tuning.stopped


def test_a_gpu_curve_climbs_to_the_limit_and_ties_go_to_the_smaller_size() -> None:
    device = FakeDevice({1: 1.0, 2: 0.5, 4: 0.25, 8: 0.125, 16: 0.1, 32: 0.099})
    tuning = measure(device.run, sizes_up_to(32), budget_s=1e9, warm_each=True, clock=device.clock)
    # 32 is within TIE of 16: the smaller batch has lower latency and spare memory.
    assert tuning.size == 16
    assert device.runs == each([1, 2, 4, 8, 16, 32], REPEATS + 1)  # each size warmed once


def test_out_of_memory_ends_the_climb_at_the_last_size_that_fit() -> None:
    device = FakeDevice({1: 1.0, 2: 0.5, 4: 0.3, 8: 0.2}, oom_at=8)
    tuning = measure(device.run, sizes_up_to(64), budget_s=1e9, warm_each=False, clock=device.clock)
    assert tuning.size == 4
    assert tuning.stopped == "out of memory at 8"


@pytest.mark.parametrize(("budget_s", "sizes"), [(24, [1, 2]), (17, [1])])
def test_the_time_budget_stops_before_a_probe_that_would_overrun_it(
    budget_s: float, sizes: list[int]
) -> None:
    device = FakeDevice({1: 2.0, 2: 1.5, 4: 1.2, 8: 1.0})
    # Three passes of 1 and of 2 cost 6 + 9 s; those of 4 would take about 18 s more.
    # With 17 s, the 12 s of 2 would overrun it: one pass of 2 (4 s) would not.
    tuning = measure(
        device.run, sizes_up_to(8), budget_s=budget_s, warm_each=False, clock=device.clock
    )
    assert device.runs == each(sizes)
    assert tuning.size == sizes[-1]
    assert "budget" in tuning.stopped


def test_one_lucky_pass_of_a_larger_size_does_not_win() -> None:
    # 16 is slower per image than 8 in two passes of three; its first pass was lucky.
    device = Scripted({8: [1.0, 1.02, 0.98], 16: [0.95, 1.12, 1.15]})
    tuning = measure(device.run, [8, 16], budget_s=1e9, warm_each=False, clock=device.clock)
    assert tuning.size == 8
    # What was measured stays visible: the median rate of each size and its spread.
    assert "8: 1.00 (4%)" in tuning.describe()
    assert "16: 0.89 (" in tuning.describe()


def test_a_noisy_cpu_curve_picks_its_true_best_every_time() -> None:
    # On average 16 is 10% slower per image than 8 (BLIP-base on the 2-core machine), but
    # a pass can be 10% off either way: a lucky pass of 16 beats an unlucky one of 8.
    curve = {1: 2.0, 2: 1.6, 4: 1.4, 8: 1.0, 16: 1.1, 32: 1.3}
    chosen = []
    for seed in range(300):
        device = NoisyDevice(curve, noise=0.1, seed=seed)
        tuning = measure(
            device.run, sizes_up_to(32), budget_s=1e9, warm_each=False, clock=device.clock
        )
        chosen.append(tuning.size)
    assert set(chosen) == {8}


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
        assert probes[: 3 * REPEATS] == each([1, 2, 4])
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
