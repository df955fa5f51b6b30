"""The background tickers' one thread helper: ticks on, through failures, until stopped."""

from __future__ import annotations

import threading
import time

from imageq.workers.runtime.ticker import Ticker


def test_a_failing_tick_is_logged_and_the_next_one_comes() -> None:
    calls: list[float] = []
    twice = threading.Event()

    def tick() -> None:
        calls.append(time.monotonic())
        if len(calls) >= 3:
            twice.set()
        if len(calls) == 1:
            raise ConnectionError("Redis restarting")

    ticker = Ticker("test-ticker", 0.01, tick).start()
    assert twice.wait(5)
    ticker.stop()
    seen = len(calls)
    time.sleep(0.05)
    assert len(calls) == seen and ticker.stopped


def test_jitter_spreads_the_waits_within_its_bounds() -> None:
    ticker = Ticker("t", 1.0, lambda: None, jitter=0.2)
    waits = [ticker._wait_s() for _ in range(200)]
    assert all(0.8 <= w <= 1.2 for w in waits) and max(waits) - min(waits) > 0.1
