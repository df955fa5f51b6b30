"""Queue depths and backlogs read straight from Redis (what Flower does not show).

- **depth**: messages waiting in a queue's Redis lists, all ten priority sub-lists.
- **reserved**: messages a live worker has taken from the queue but not started (Celery's
  reserved and ETA/countdown requests, not yet handed to the pool), as each worker
  reports them in its heartbeat (workers/ops/live_workers.py).
- **backlog** = depth + reserved: the work no worker has started, the number an
  autoscaler should follow.

Messages a worker held when it died are in neither until Redis restores them to their
queue (the visibility timeout) or a failover sweep re-sends their jobs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

import redis

from imageq.api_client.records import RecordStore

# kombu's Redis transport keeps one list per priority step, named queue + SEP + step.
_PRIORITY_SEP = "\x06\x16"


def priority_lists(queue: str) -> list[str]:
    """The queue's Redis lists in the order a worker drains them (most urgent first)."""
    return [queue] + [f"{queue}{_PRIORITY_SEP}{step}" for step in range(1, 10)]


def queue_depth(client: redis.Redis, queue: str) -> int:
    pipe = client.pipeline(transaction=False)
    for name in priority_lists(queue):
        pipe.llen(name)
    return int(sum(pipe.execute()))


def live_workers(store: RecordStore) -> list[dict[str, Any]]:
    """Workers whose heartbeat key has not expired, from the ``workers`` index (no scan
    of the keyspace: a scrape may call this every few seconds)."""
    names = store.redis.zrangebyscore(store.keys.workers(), time.time(), "+inf")
    if not names:
        return []
    raws = store.redis.mget([store.keys.worker(str(name)) for name in names])
    out = [json.loads(raw) for raw in raws if raw]
    return sorted(out, key=lambda w: str(w.get("name")))


def reserved_by_queue(workers: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Messages live workers hold but have not started, summed by queue."""
    out: dict[str, int] = {}
    for worker in workers:
        reserved = worker.get("reserved") or {}
        if not isinstance(reserved, Mapping):
            continue
        for queue, count in reserved.items():
            out[str(queue)] = out.get(str(queue), 0) + int(count)
    return out
