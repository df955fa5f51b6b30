"""Queue depths read straight from the broker's Redis lists (what Flower does not show)."""

from __future__ import annotations

import redis

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
