"""kombu's Redis transport with one client object per connection pool.

kombu's Redis channel builds a new ``redis.Redis`` for every command it sends outside
its poll: a delivery's bookkeeping, an ack, each batch of task events. Building one
costs about 0.18 ms of CPU in redis-py 8 (three or four per job; ``bench/transport.py``
measures a delivery and its ack), and the objects differ only in being new:
they share the channel's connection pool, and a client is safe to share between
threads (each command takes a connection from the pool). This channel builds one and
keeps it until kombu replaces the channel's pool.

Only worker processes use it, and only on ``redis://`` brokers (set as Celery's worker
starts: ``imageq.tasks.signals``). A named transport replaces the connection URL's scheme, by
which kombu turns TLS on for ``rediss://`` and Flower picks its broker client: so
``rediss://`` and Sentinel brokers, Flower and Celery's other commands keep kombu's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis

#: What Celery's ``broker_transport`` names to load it.
TRANSPORT = f"{__name__}:Transport"


class Channel(kombu_redis.Channel):
    _shared_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        shared = self._shared_client
        if shared is None or shared.connection_pool is not self.pool:
            shared = self._shared_client = self._create_client()
        yield shared


class Transport(kombu_redis.Transport):
    Channel = Channel


def transport_for(broker_url: str) -> str | None:
    """The ``broker_transport`` for a worker on ``broker_url``; None: kombu's choice."""
    scheme = broker_url.partition("://")[0].lower()
    return TRANSPORT if scheme == "redis" else None


def use_in_worker(conf: Any) -> None:
    """Set a starting worker's Celery config (``celeryd_init``'s ``conf``) to this
    transport where its broker URL allows."""
    transport = transport_for(str(conf.broker_url or ""))
    if transport is not None:
        conf.broker_transport = transport
