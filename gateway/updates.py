"""Job updates for requests that wait: ``Prefer: wait=N`` and event streams.

Every record change is published on the job's channel (``imageq.api_client.records``). One
gateway process keeps one Redis subscription connection for all its waiting requests,
subscribing to a job's channel while someone watches it, rather than a connection per
waiting request: a thousand open event streams cost one connection, not a thousand.

Messages can be missed (a reconnect after Redis restarts): watchers also re-read the
record when they are told the connection dropped, and every few seconds regardless.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("imageq.gateway")

# A watcher re-reads its record this often when its channel is quiet.
POLL_S = 5.0
# Updates kept per watcher; a slow reader loses the older ones (the newest is the record).
_BACKLOG = 32
# How long a new watcher waits for Redis to confirm its subscription before reading.
_CONFIRM_S = 1.0
_RECONNECT_S = 0.5

#: What a watcher's queue carries: a record's JSON, or None for "re-read it".
Update = str | None


class UpdateHub:
    """Fan-out of job channels to in-process watchers over one pub/sub connection."""

    def __init__(self, client: aioredis.Redis, own_channel: str) -> None:
        self.redis = client
        # Always subscribed, so the connection exists even with no job watched.
        self.own_channel = own_channel
        self._pubsub: Any = None
        self._watchers: dict[str, set[asyncio.Queue[Update]]] = {}
        self._confirmed: dict[str, asyncio.Event] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        if self._task is None or self._task.done():
            self._pubsub = self.redis.pubsub()
            await self._pubsub.subscribe(self.own_channel)
            self._task = asyncio.create_task(self._read(), name="imageq-gateway-updates")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError, RedisError, OSError):
                await self._task
            self._task = None
        if self._pubsub is not None:
            with suppress(RedisError, OSError):
                await self._pubsub.aclose()
            self._pubsub = None

    @asynccontextmanager
    async def watch(self, channel: str) -> AsyncIterator[asyncio.Queue[Update]]:
        """Updates of one channel while the block runs; subscribed when it starts.

        Read the record *after* entering: an update between the read and the
        subscription would otherwise be missed.
        """
        queue: asyncio.Queue[Update] = asyncio.Queue(maxsize=_BACKLOG)
        async with self._lock:
            await self._start()
            watchers = self._watchers.setdefault(channel, set())
            watchers.add(queue)
            if len(watchers) == 1:
                self._confirmed[channel] = asyncio.Event()
                try:
                    await self._pubsub.subscribe(channel)
                except (RedisError, OSError):
                    self._forget(channel, queue)
                    raise
        confirmed = self._confirmed.get(channel)
        if confirmed is not None:
            with suppress(TimeoutError):
                await asyncio.wait_for(confirmed.wait(), _CONFIRM_S)
        try:
            yield queue
        finally:
            async with self._lock:
                if self._forget(channel, queue) and self._pubsub is not None:
                    with suppress(RedisError, OSError):
                        await self._pubsub.unsubscribe(channel)

    def _forget(self, channel: str, queue: asyncio.Queue[Update]) -> bool:
        """Drop one watcher; True when it was the channel's last."""
        watchers = self._watchers.get(channel)
        if watchers is None:
            return False
        watchers.discard(queue)
        if watchers:
            return False
        del self._watchers[channel]
        self._confirmed.pop(channel, None)
        return True

    def _deliver(self, channel: str, update: Update) -> None:
        for queue in self._watchers.get(channel, ()):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(update)

    async def _read(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except (RedisError, OSError) as exc:
                log.warning("update subscription lost (%s); reconnecting", type(exc).__name__)
                # Whatever was published meanwhile is lost: every watcher re-reads.
                for channel in list(self._watchers):
                    self._deliver(channel, None)
                await self._reconnect()
                continue
            if not message:
                continue
            kind, channel = message.get("type"), str(message.get("channel"))
            if kind == "subscribe" and channel in self._confirmed:
                self._confirmed[channel].set()
            elif kind == "message":
                self._deliver(channel, str(message.get("data")))

    async def _reconnect(self) -> None:
        while True:
            await asyncio.sleep(_RECONNECT_S)
            old, self._pubsub = self._pubsub, self.redis.pubsub()
            with suppress(RedisError, OSError):
                await old.aclose()
            try:
                async with self._lock:
                    await self._pubsub.subscribe(self.own_channel, *self._watchers)
            except (RedisError, OSError):
                continue
            for channel in list(self._watchers):
                self._deliver(channel, None)
            return


async def next_update(queue: asyncio.Queue[Update], timeout_s: float) -> tuple[bool, Update]:
    """(True, update) when one came within ``timeout_s``, else (False, None)."""
    try:
        return True, await asyncio.wait_for(queue.get(), max(0.0, timeout_s))
    except TimeoutError:
        return False, None
