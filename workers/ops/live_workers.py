"""Live workers announce themselves in Redis, so ``imageq status`` can list them.

Each worker keeps one key, ``worker:<name>`` (JSON, expiring three beats after its last
write), and a score in the ``workers`` index (a sorted set: name -> when the key
expires), so readers find the live workers without scanning the keyspace. A worker
writes its key every ``every_s`` and at once whenever a job ends here, so a finished job
is in ``processed`` by the time anyone can see its final record and ask.

At a thousand jobs a second jobs end in bursts (a batch of 32 at once): one write in
flight takes along every job that ended meanwhile instead of queueing one write per
job, and the last minute's completions are a deque pruned from the old end, not a list
rebuilt per job.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from imageq.api_client.records import RecordStore, utcnow
from imageq.workers.runtime.ticker import Ticker

log = logging.getLogger(__name__)

#: Messages this worker holds but has not started, by queue (from the Celery side).
Reserved = Callable[[], dict[str, int]]


def _nothing_reserved() -> dict[str, int]:
    return {}


class WorkerRegistry:
    def __init__(
        self,
        store: RecordStore,
        name: str,
        info: dict[str, Any],
        every_s: float = 2.0,
        reserved: Reserved = _nothing_reserved,
    ) -> None:
        self.store = store
        self.name = name
        self.every_s = every_s
        self.reserved = reserved
        self.info = {
            **info,
            "name": name,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": utcnow(),
        }
        self.current: dict[str, str] = {}
        self.processed = 0
        self._done_times: deque[float] = deque()
        self._lock = threading.Lock()
        # Writes in the order their snapshots were taken: a batch of jobs ends in many
        # threads at once, and an older snapshot must never overwrite a newer one.
        self._publish_lock = threading.Lock()
        # A job ended since the write in flight took its snapshot / a thread is writing.
        self._dirty = False
        self._writing = False
        # Keeps beating through a Redis restart.
        self._ticker = Ticker("imageq-registry", every_s, self.publish)

    @property
    def key(self) -> str:
        return self.store.keys.worker(self.name)

    @property
    def index_key(self) -> str:
        return self.store.keys.workers()

    def job_started(self, job_id: str, kind: str) -> None:
        with self._lock:
            self.current[job_id] = kind

    def job_finished(self, job_id: str, *, done: bool = True) -> None:
        """The job's task ended here; ``done``: its job ended and counts (once per job)."""
        with self._lock:
            self.current.pop(job_id, None)
            if done:
                self.processed += 1
                self._done_times.append(time.monotonic())
                self._prune()
            self._dirty = True
            if self._writing:
                # The thread writing now writes again once it is done, with this job in.
                return
            self._writing = True
        try:
            while True:
                with self._lock:
                    if not self._dirty:
                        self._writing = False
                        return
                    self._dirty = False
                self.publish(prune=False)
        except Exception as exc:  # the heartbeat thread writes it again within every_s
            with self._lock:
                self._writing = False
            log.warning("registry publish: %s", exc)

    def _prune(self) -> None:
        """Drop completions older than a minute (under ``_lock``)."""
        horizon = time.monotonic() - 60
        while self._done_times and self._done_times[0] <= horizon:
            self._done_times.popleft()

    def snapshot(self) -> dict[str, Any]:
        try:
            reserved = self.reserved()
        except Exception as exc:  # a snapshot is never lost to a count
            log.debug("reserved messages: %s", exc)
            reserved = {}
        with self._lock:
            self._prune()  # an idle worker's rate falls to 0 within the minute
            return {
                **self.info,
                "current": dict(self.current),
                "processed": self.processed,
                "jobs_per_min": len(self._done_times),
                "reserved": reserved,
                "seen_at": utcnow(),
            }

    def publish(self, prune: bool = True) -> None:
        """Write this worker's key; ``prune``: also drop dead workers from the index (the
        heartbeat's job, not every finished job's)."""
        ttl = max(3, int(self.every_s * 3))
        with self._publish_lock:
            snapshot = self.snapshot()
            pipe = self.store.redis.pipeline(transaction=False)
            pipe.set(self.key, json.dumps(snapshot), ex=ttl)
            now = time.time()
            pipe.zadd(self.index_key, {self.name: now + ttl})
            if prune:
                # Workers that stopped beating without a goodbye (killed) leave the index.
                pipe.zremrangebyscore(self.index_key, "-inf", now - 60)
            pipe.execute()

    def start(self) -> None:
        self.publish()
        self._ticker.start()

    def stop(self) -> None:
        self._ticker.stop()
        try:
            pipe = self.store.redis.pipeline(transaction=False)
            pipe.delete(self.key)
            pipe.zrem(self.index_key, self.name)
            pipe.execute()
        except Exception as exc:  # Redis may already be gone at shutdown
            log.debug("registry cleanup: %s", exc)
