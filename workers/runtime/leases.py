"""One thread per worker for every running job: lease renewals and the cancel set.

A thread per job (started, renewing on its own, joined at the end) cost each job a
thread start and join and one renewal round trip per job per beat. Here one thread
renews the leases of all of a worker's running jobs in one script per beat, and keeps
the set of jobs canceled while they run, so that a job's "stop?" check (``JobControl``)
costs no round trip, on its own thread or on the model's:

- it listens on the ``cancels`` channel (``RecordStore.request_cancel`` publishes there),
  so a cancel from any process reaches the set within a round trip;
- a cancel requested through this process's own store reaches it at once;
- every beat it also reads the cancel keys of the jobs it watches (one MGET), and on
  every (re)subscription, so a message lost while the subscription was down (Redis
  restarting) is seen within one beat. While it is not subscribed, checks ask Redis.

A job's ``claim`` (``transitions``) read its cancel key before it started, atomically
with taking the lease; the job is watched before that read, so no cancel falls between.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import redis

from imageq.api_client.records import RecordStore
from imageq.api_client.scripts import script

if TYPE_CHECKING:
    from imageq.workers.runtime.control import LeaseKeeper

log = logging.getLogger(__name__)

#: How long a cancel seen for a job not (yet) watched here is remembered: a message may
#: arrive between a job's claim and its watch.
RECENT_S = 300.0


class Heart:
    """Renews the leases of a worker's running jobs and knows which were canceled."""

    def __init__(self, store: RecordStore, every_s: float) -> None:
        self.store = store
        self.every_s = max(0.05, every_s)
        self._keepers: dict[str, LeaseKeeper] = {}
        self._watched: dict[str, int] = {}
        self._canceled: dict[str, float] = {}
        self._subscribed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat = script(store.redis, "beat")
        store.cancel_listeners.append(self._cancel_seen)

    # -- jobs -----------------------------------------------------------------------------
    def watch(self, job_id: str) -> None:
        """Follow ``job_id``'s cancel from now on (before its claim reads the key)."""
        self._ensure_started()
        with self._lock:
            self._watched[job_id] = self._watched.get(job_id, 0) + 1

    def unwatch(self, job_id: str) -> None:
        with self._lock:
            left = self._watched.get(job_id, 0) - 1
            if left > 0:
                self._watched[job_id] = left
            else:
                self._watched.pop(job_id, None)
                self._canceled.pop(job_id, None)

    def canceled(self, job_id: str) -> bool | None:
        """Whether a cancel was seen; None when the set cannot say (not subscribed)."""
        with self._lock:
            if job_id in self._canceled:
                return True
            return False if self._subscribed and job_id in self._watched else None

    def add(self, keeper: LeaseKeeper) -> None:
        self._ensure_started()
        with self._lock:
            self._keepers[keeper.job_id] = keeper

    def remove(self, keeper: LeaseKeeper) -> None:
        with self._lock:
            if self._keepers.get(keeper.job_id) is keeper:
                del self._keepers[keeper.job_id]

    def _cancel_seen(self, job_id: str) -> None:
        with self._lock:
            self._canceled[job_id] = time.monotonic()

    # -- the thread -----------------------------------------------------------------------
    def _ensure_started(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="imageq-leases", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        if self._cancel_seen in self.store.cancel_listeners:
            self.store.cancel_listeners.remove(self._cancel_seen)

    def _run(self) -> None:
        next_beat = time.monotonic() + self.every_s
        backoff = 0.1
        while not self._stop.is_set():
            pubsub = self.store.redis.pubsub()
            try:
                pubsub.subscribe(self.store.keys.cancels())
                while not self._stop.is_set():
                    wait = max(0.0, min(next_beat - time.monotonic(), 0.5))
                    message = pubsub.get_message(timeout=wait)
                    if message is not None:
                        self._on_message(message)
                    if time.monotonic() >= next_beat:
                        next_beat = time.monotonic() + self.every_s
                        self.beat()
                    backoff = 0.1
            except Exception as exc:  # Redis restarting: checks ask Redis until we are back
                with self._lock:
                    self._subscribed = False
                # Once per outage at warning level: the reconnect loop must not flood logs.
                level = logging.WARNING if backoff == 0.1 else logging.DEBUG
                log.log(level, "lease and cancel thread: %s; reconnecting", exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.every_s
                    self._beat_quietly()
            finally:
                try:
                    pubsub.close()
                except Exception as exc:  # already broken: nothing to close
                    log.debug("closing the cancel subscription: %s", exc)
        with self._lock:
            self._subscribed = False

    def _on_message(self, message: dict[str, object]) -> None:
        kind = message.get("type")
        if kind == "subscribe":
            # Whatever was published while not subscribed is in the keys: read them.
            self._read_cancel_keys()
            with self._lock:
                self._subscribed = True
        elif kind == "message":
            data = message.get("data")
            job_id = data.decode() if isinstance(data, bytes) else str(data)
            self._cancel_seen(job_id)

    def _read_cancel_keys(self) -> None:
        with self._lock:
            watched = list(self._watched)
        if not watched:
            return
        values = self.store.redis.mget([self.store.keys.cancel(j) for j in watched])
        for job_id, value in zip(watched, values, strict=True):
            if value is not None:
                self._cancel_seen(job_id)

    def _beat_quietly(self) -> None:
        try:
            self.beat()
        except redis.RedisError as exc:
            log.debug("lease renewal: %s", exc)

    def beat(self) -> None:
        """Renew every lease in one script; a lease that was not renewed is kept or lost
        job by job (``LeaseKeeper.keep_or_lose``); cancels are read from their keys."""
        now = time.monotonic()
        with self._lock:
            keepers = [k for k in self._keepers.values() if not k.lost]
            cutoff = now - RECENT_S
            for job_id in [j for j, t in self._canceled.items() if t < cutoff]:
                if job_id not in self._watched:
                    del self._canceled[job_id]
        if keepers:
            ttl = self.store.settings.lease_ttl_s
            renewed = self._beat(
                keys=[self.store.keys.running()]
                + [self.store.keys.lease(k.job_id) for k in keepers],
                args=[int(ttl * 1000), time.time() + ttl]
                + [part for k in keepers for part in (k.token, k.job_id)],
            )
            for keeper, ok in zip(keepers, renewed, strict=True):
                if ok:
                    keeper.renewed(now)
                else:
                    keeper.keep_or_lose()
        self._read_cancel_keys()
