"""One periodic thread: the background tickers of a worker process (the failover sweeper,
the webhook retry pump, the live-worker registry's heartbeat, a lease's own beat).

Each calls ``tick`` every ``every_s`` on a daemon thread until ``stop``; an exception is
logged (Redis restarting, a broker away for a moment) and the next tick comes as usual,
so no ticker dies of a passing fault.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Ticker:
    def __init__(
        self,
        name: str,
        every_s: float,
        tick: Callable[[], object],
        *,
        jitter: float = 0.0,
        level: int = logging.WARNING,
    ) -> None:
        """``jitter``: each wait is ``every_s`` times a random factor in 1 ± jitter, so
        the tickers of a fleet started together do not run in step. ``level``: how loudly
        a failed tick is logged."""
        self.name = name
        self.every_s = max(0.01, every_s)
        self.tick = tick
        self.jitter = jitter
        self.level = level
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Ticker:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _wait_s(self) -> float:
        if not self.jitter:
            return self.every_s
        return self.every_s * random.uniform(1 - self.jitter, 1 + self.jitter)

    def _loop(self) -> None:
        while not self._stop.wait(self._wait_s()):
            try:
                self.tick()
            except Exception as exc:
                log.log(self.level, "%s: %s", self.name, exc)
