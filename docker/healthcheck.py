"""Container health check of an imageq worker (the Dockerfile's HEALTHCHECK).

Healthy when a worker on this host (the container's hostname) has a live heartbeat in
Redis — it loaded its model, reached Redis and its heartbeat thread runs — and, when
``IMAGEQ_METRICS_PORT`` is set, its metrics endpoint answers. Exit 0 healthy, 1 not,
with one line saying why (``docker inspect`` shows it).
"""

from __future__ import annotations

import socket
import sys
import urllib.request

import redis

from imageq.api_client.records import RecordStore
from imageq.api_client.settings import Settings
from imageq.api_client.status import live_workers

TIMEOUT_S = 5.0


def check(settings: Settings, hostname: str) -> str | None:
    """None when healthy, else the reason."""
    client = redis.Redis.from_url(
        settings.records_redis_url,
        decode_responses=True,
        socket_timeout=TIMEOUT_S,
        socket_connect_timeout=TIMEOUT_S,
    )
    try:
        workers = live_workers(RecordStore(client, settings))
    except redis.RedisError as exc:
        return f"cannot read worker heartbeats from Redis: {exc}"
    finally:
        client.close()
    mine = [w for w in workers if w.get("host") == hostname]
    if not mine:
        return f"no live worker heartbeat from host {hostname}"
    if settings.metrics_port:
        url = f"http://127.0.0.1:{settings.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as answer:
                if answer.status != 200:
                    return f"metrics endpoint answered {answer.status}"
        except OSError as exc:
            return f"metrics endpoint {url}: {exc}"
    return None


def main() -> int:
    problem = check(Settings.from_env(), socket.gethostname())
    if problem is None:
        print("healthy")
        return 0
    print(f"unhealthy: {problem}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
