"""The batch size that feeds this device best: measured at warm-up, and again on drift.

A GPU runs a batch of 128 images almost as fast as a batch of 8; this CPU runs BLIP-base
at batch 23 slower per image than at batch 8. No one default suits both, and a user
should not have to find the knee of each device's curve. So a batching worker (caption,
match) measures at warm-up: its model runs synthetic batches of 1, 2, 4, ... images, up
to ``IMAGEQ_BATCH_TUNING_MAX_IMAGES``, and it serves with the size that gave the most
images/s. Each size runs ``REPEATS`` times and counts with its median rate; a larger
size wins only when it beats the best so far by more than ``TIE`` plus the spread of
either size's passes (noise). The climb stops early when a size runs out of memory,
when it is clearly slower per image than the best so far (past the knee, the curve does
not come back), or when the next size would overrun the time budget. A smaller batch
has lower latency and leaves memory to spare, so it wins what the noise cannot tell.

``IMAGEQ_MAX_BATCH_IMAGES`` set by the user is served as given, and nothing is measured
(``enabled``).

Drift: the batcher reports every call at the tuned size (``observe``). The rate of the
first calls after a tuning is the baseline; when the moving average then strays from it
by more than ``drift`` (another process took the GPU, thermal throttling, a new traffic
mix), the next moment the batcher's queue is empty it measures again (``due`` /
``retune``), at most once per ``min_interval_s``. Real traffic decides when; a synthetic
probe never holds up a waiting job, since the batcher runs it only with none waiting.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from imageq.api_client.errors import OutOfMemory
from imageq.api_client.settings import Settings

log = logging.getLogger(__name__)

#: Runs the model once on a synthetic batch of ``n`` images (raises ``OutOfMemory``).
RunBatch = Callable[[int], None]

#: A smaller size within this fraction of the best rate wins.
TIE = 0.03
#: A size this much slower than the best ends the climb.
KNEE = 0.85
#: Measured passes per size. With one, two starts of the same BLIP-base caption worker
#: on the 2-core machine chose 16 and 8 (16 is ~10% slower per image there): one lucky
#: pass decided. On that curve with passes up to 10% off either way (simulated, 5000
#: seeds), one pass chose 16 in 7% of starts; 3 passes, median and spread, in 0.04%.
REPEATS = 3


def enabled(settings: Settings) -> bool:
    """Tune unless the user chose a batch size (or turned tuning off)."""
    return settings.batch_tuning and not settings.is_set("max_batch_images")


def sizes_up_to(limit: int) -> list[int]:
    """1, 2, 4, ... and ``limit`` itself."""
    sizes, size = [], 1
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, max(1, limit)]


@dataclass(frozen=True)
class Probe:
    size: int
    #: Seconds of each measured pass.
    passes: tuple[float, ...]

    @property
    def seconds(self) -> float:
        """The median pass."""
        return statistics.median(self.passes)

    @property
    def images_per_s(self) -> float:
        return self.size / max(self.seconds, 1e-9)

    @property
    def spread(self) -> float:
        """How far apart the passes were, as a fraction of the median (0 for one pass)."""
        return (max(self.passes) - min(self.passes)) / max(self.seconds, 1e-9)


@dataclass
class Tuning:
    """What one measurement found: the size chosen, each probe, and why it stopped."""

    size: int
    probes: list[Probe] = field(default_factory=list)
    stopped: str = "limit"

    def describe(self) -> str:
        rates = ", ".join(f"{p.size}: {p.images_per_s:.2f} ({p.spread:.0%})" for p in self.probes)
        return (
            f"batch {self.size} (median images/s by batch size (spread of the passes): "
            f"{rates}; stopped: {self.stopped})"
        )


def measure(
    run: RunBatch,
    sizes: list[int],
    *,
    budget_s: float,
    warm_each: bool,
    repeats: int = REPEATS,
    clock: Callable[[], float] = time.perf_counter,
) -> Tuning:
    """Probe ``sizes`` in order, ``repeats`` passes each; the best median rate wins
    (``TIE``, noise, ``KNEE``: see above).

    ``warm_each``: run each size once unmeasured first (GPU kernels, allocator growth and
    compiled graphs pay once per new shape). On a CPU that pass would only add to the
    cost of tuning.
    """
    repeats = max(1, repeats)
    began = clock()
    tuning = Tuning(size=sizes[0])
    best: Probe | None = None
    for size in sizes:
        if tuning.probes:
            last = tuning.probes[-1]
            # The next probe costs about its share of the last one's pass, once per pass
            # (and the warm pass); past the budget, stop with what is known.
            passes = repeats + (1 if warm_each else 0)
            estimate = last.seconds * size / last.size * passes
            if clock() - began + estimate > budget_s:
                tuning.stopped = f"time budget of {budget_s:.0f} s"
                break
        try:
            if warm_each:
                run(size)
            timed = []
            for _ in range(repeats):
                started = clock()
                run(size)
                timed.append(clock() - started)
            probe = Probe(size, tuple(timed))
        except OutOfMemory:
            tuning.stopped = f"out of memory at {size}"
            break
        tuning.probes.append(probe)
        # Larger wins only by more than its passes, or the best's, differed among
        # themselves: a difference within that is noise, and the smaller size is safer.
        noise = 0.0 if best is None else max(probe.spread, best.spread)
        if best is None or probe.images_per_s > best.images_per_s * (1 + TIE + noise):
            best = probe
        elif probe.images_per_s < best.images_per_s * KNEE:
            tuning.stopped = f"past the knee at {size}"
            break
    if best is not None:
        tuning.size = best.size
    return tuning


class AutoBatch:
    """The tuned size of one worker's batcher, and the watch for drift."""

    def __init__(
        self,
        run: RunBatch,
        *,
        limit: int,
        budget_s: float,
        warm_each: bool,
        repeats: int = REPEATS,
        drift: float = 0.3,
        window: int = 50,
        min_interval_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run = run
        self.limit = max(1, limit)
        self.budget_s = budget_s
        self.warm_each = warm_each
        self.repeats = repeats
        self.drift = drift
        self.window = max(1, window)
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.size = 1
        self.last: Tuning | None = None
        self._tuned_at = 0.0
        self._baseline: list[float] = []
        self._average: float | None = None
        self._due = False
        self._lock = threading.Lock()

    def tune(self) -> int:
        """Measure now (warm-up; a re-tune); returns the size to serve with."""
        tuning = measure(
            self.run,
            sizes_up_to(self.limit),
            budget_s=self.budget_s,
            warm_each=self.warm_each,
            repeats=self.repeats,
        )
        with self._lock:
            self.size, self.last = tuning.size, tuning
            self._tuned_at = self.clock()
            self._baseline, self._average, self._due = [], None, False
        log.info("micro-batching: %s", tuning.describe())
        return tuning.size

    def postpone(self) -> None:
        """A measurement failed: serve on at the current size, and look again later."""
        with self._lock:
            self._tuned_at = self.clock()
            self._baseline, self._average, self._due = [], None, False

    def observe(self, size: int, seconds: float) -> None:
        """One model call of ``size`` images took ``seconds`` (only full calls count: a
        part-empty one says how busy the queue is, not what the device can do)."""
        if size != self.size or seconds <= 0:
            return
        rate = size / seconds
        with self._lock:
            if len(self._baseline) < self.window:
                self._baseline.append(rate)
                return
            alpha = 2 / (self.window + 1)
            average = rate if self._average is None else self._average
            self._average = average = average + alpha * (rate - average)
            baseline = sum(self._baseline) / len(self._baseline)
            strayed = abs(average / baseline - 1) > self.drift
            if strayed and self.clock() - self._tuned_at >= self.min_interval_s:
                if not self._due:
                    log.info(
                        "micro-batching: %.1f images/s at batch %d against %.1f after "
                        "tuning; measuring again when the queue is empty",
                        average,
                        size,
                        baseline,
                    )
                self._due = True

    def due(self) -> bool:
        with self._lock:
            return self._due


def for_worker(settings: Settings, device: str, run: RunBatch) -> tuple[int, AutoBatch | None]:
    """The batch size a batching worker starts with, and its ``AutoBatch`` (None: the
    size is the user's, ``IMAGEQ_MAX_BATCH_IMAGES``, or tuning is off)."""
    if not enabled(settings):
        return settings.max_batch_images, None
    autobatch = AutoBatch(
        run,
        limit=settings.batch_tuning_max_images,
        budget_s=settings.batch_tuning_budget_s,
        warm_each=device.startswith("cuda"),
    )
    return autobatch.tune(), autobatch


def measured(handlers: Mapping[str, object]) -> AutoBatch | None:
    """The ``AutoBatch`` of a handler's micro-batcher (the largest, should several
    batch); None when no batch size was measured, so the pool the launcher sized stands."""
    found = [
        auto
        for handler in handlers.values()
        if isinstance(
            auto := getattr(getattr(handler, "batcher", None), "autobatch", None), AutoBatch
        )
    ]
    return max(found, key=lambda auto: auto.size, default=None)
