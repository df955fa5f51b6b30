"""Queue depths read straight from the broker's Redis lists (what Flower does not show)."""

from __future__ import annotations

import redis

# kombu's Redis transport keeps one list per priority step, named queue + SEP + step.
_PRIORITY_SEP = "\x06\x16"


def queue_depth(client: redis.Redis, queue: str) -> int:
    names = [queue] + [f"{queue}{_PRIORITY_SEP}{step}" for step in range(1, 10)]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
    return int(sum(pipe.execute()))
