"""Live workers announce themselves in Redis, so ``imageq status`` can list them."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

from api_client.records import RecordStore, utcnow

log = logging.getLogger(__name__)


class WorkerRegistry:
    def __init__(
        self, store: RecordStore, name: str, info: dict[str, Any], every_s: float = 2.0
    ) -> None:
        self.store = store
        self.name = name
        self.every_s = every_s
        self.info = {
            **info,
            "name": name,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": utcnow(),
        }
        self.current: dict[str, str] = {}
        self.processed = 0
        self._done_times: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="imageq-registry", daemon=True)

    @property
    def key(self) -> str:
        return self.store.key("worker", self.name)

    def job_started(self, job_id: str, kind: str) -> None:
        with self._lock:
            self.current[job_id] = kind

    def job_finished(self, job_id: str) -> None:
        with self._lock:
            self.current.pop(job_id, None)
            self.processed += 1
            now = time.monotonic()
            self._done_times = [t for t in self._done_times if now - t < 60] + [now]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                **self.info,
                "current": dict(self.current),
                "processed": self.processed,
                "jobs_per_min": len(self._done_times),
                "seen_at": utcnow(),
            }

    def publish(self) -> None:
        ttl = max(3, int(self.every_s * 3))
        self.store.redis.set(self.key, json.dumps(self.snapshot()), ex=ttl)

    def start(self) -> None:
        self.publish()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self.store.redis.delete(self.key)
        except Exception as exc:  # Redis may already be gone at shutdown
            log.debug("registry cleanup: %s", exc)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.publish()
            except Exception as exc:  # keep beating through a Redis restart
                log.warning("registry heartbeat: %s", exc)
