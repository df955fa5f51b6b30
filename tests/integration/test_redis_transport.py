"""The worker's Redis transport: kombu's, with one client per connection pool."""

from __future__ import annotations

import itertools

import pytest
from celery import Celery
from kombu import Connection, Exchange, Message, Queue
from kombu.transport.redis import Mutex

from imageq.api_client.celery_config import celery_config, transport_options
from imageq.api_client.settings import Settings
from imageq.workers.runtime.redis_transport import TRANSPORT, Channel, transport_for, use_in_worker
from imageq.workers.testing.services import RedisServer

_n = itertools.count()


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    # A database of its own: kombu's unacked hash is one per database, shared by every
    # queue in it.
    return redis_server.url.rsplit("/", 1)[0] + "/7"


def test_redis_urls_get_it_and_sentinel_keeps_kombus_own() -> None:
    assert transport_for("redis://localhost:6379/0") == TRANSPORT
    # kombu turns TLS on for rediss by the transport's name: a named one would lose it.
    assert transport_for("rediss://:pw@cache.example:6380/1") is None
    assert transport_for("sentinel://a:26379;sentinel://b:26379") is None


def test_a_starting_worker_gets_it_and_other_commands_keep_kombus() -> None:
    settings = Settings.from_env({}, broker_url="redis://localhost:6379/0")
    conf = Celery("t", set_as_current=False).conf
    conf.update(celery_config(settings))
    assert conf.broker_transport is None  # what producers, Flower and `celery inspect` use
    use_in_worker(conf)
    assert conf.broker_transport == TRANSPORT
    sentinel = Celery("t", set_as_current=False).conf
    sentinel.update(celery_config(settings.with_(broker_url="sentinel://localhost:26379")))
    use_in_worker(sentinel)
    assert sentinel.broker_transport is None


def test_messages_go_and_come_back_acked_on_one_client(url: str) -> None:
    name = f"transport-{next(_n)}"
    queue = Queue(name, Exchange(name), routing_key=name)
    with Connection(url, transport=TRANSPORT) as conn:
        channel = conn.default_channel
        assert isinstance(channel, Channel)
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
        producer = conn.Producer(serializer="json")
        for index in range(3):
            producer.publish(
                {"n": index}, exchange=queue.exchange, routing_key=name, declare=[queue]
            )
        got: list[int] = []

        def on_message(body: dict[str, int], message: Message) -> None:
            got.append(body["n"])
            message.ack()

        with conn.Consumer(queue, callbacks=[on_message], accept=["json"]):
            for _ in range(3):
                conn.drain_events(timeout=5)
        assert got == [0, 1, 2]
        with channel.conn_or_acquire() as client:
            assert client.llen(name) == 0
            # Acked: nothing waits in kombu's unacked hash for redelivery.
            assert client.hlen("unacked") == 0


def test_a_new_pool_gets_a_new_client(url: str) -> None:
    with Connection(url, transport=TRANSPORT) as conn:
        channel = conn.default_channel
        with channel.conn_or_acquire() as before:
            assert before.ping()
        channel._disconnect_pools()  # what kombu does after a connection error
        with channel.conn_or_acquire() as after:
            assert after is not before and after.ping()
            assert after.connection_pool is channel.pool


@pytest.mark.parametrize("transport", ["redis", TRANSPORT])
def test_a_killed_restorers_lock_lasts_seconds_not_minutes(url: str, transport: str) -> None:
    # A worker killed while it restores unacked messages leaves kombu's restore lock
    # behind; until it expires no worker on that broker redelivers anything. With the
    # shipped settings it lives 2 restore intervals (20 s), not kombu's 300 s.
    options = transport_options(Settings().visibility_timeout_s)
    with Connection(url, transport=transport, transport_options=options) as conn:
        channel = conn.default_channel
        key, expire_s = channel.unacked_mutex_key, channel.unacked_mutex_expire
        with channel.conn_or_acquire() as client, Mutex(client, key, expire_s):
            ttl_ms = client.pttl(key)
    assert 0 < ttl_ms <= 20_000
