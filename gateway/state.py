"""What one gateway process holds: its Client, Redis connections, limits, updates hub.

Nothing here is per-tenant or per-request: every gateway replica holds the same kind of
state and any replica can answer any request (docs/operations.md, replicas).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import redis.asyncio as aioredis

from imageq.api_client.client import Client
from imageq.api_client.kinds import JOB_KINDS
from imageq.api_client.names import job_queue
from imageq.api_client.object_urls import storage_root
from imageq.api_client.queues import priority_lists
from imageq.api_client.records import RecordStore
from imageq.api_client.references import GrantReader
from imageq.api_client.schemas import JobRecord, JobStatus
from imageq.api_client.scripts import script
from imageq.api_client.settings import Settings
from imageq.api_client.tenant_caps import PriorityCaps
from imageq.gateway.errors import JobNotFound
from imageq.gateway.limits import Limits
from imageq.gateway.metrics import GatewayMetrics
from imageq.gateway.tokens import Authenticator
from imageq.gateway.updates import UpdateHub
from imageq.workers.io.storage import Storage, open_storage

T = TypeVar("T")
# Uploads and storage health checks at once per process.
_IO_THREADS = 16


def _async_redis(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=2.0,
        socket_keepalive=True,
        health_check_interval=15,
    )


class Gateway:
    def __init__(self, settings: Settings, metrics: GatewayMetrics | None = None) -> None:
        self.settings = settings
        self.client = Client(settings)
        self.store: RecordStore = self.client.store
        # Reads, auth and subscriptions run on the event loop; writes that go through
        # the Client (Celery's producer is synchronous) run in worker threads.
        self.aredis = _async_redis(settings.records_redis_url)
        self.auth = Authenticator(self.aredis, self.store, settings.gateway_token_cache_s)
        self.grants = GrantReader(self.store, settings.gateway_token_cache_s)
        #: What stored files' uris start with; tenants are shown storage:// instead.
        self.storage_root = storage_root(settings)
        self.limits = Limits(self.client.redis, self.store, settings)
        self.caps = PriorityCaps(self.client.redis, self.store)
        self.hub = UpdateHub(self.aredis, self.store.keys.gateway_hub())
        self.metrics = metrics or GatewayMetrics()
        self._brokers: dict[str, aioredis.Redis] = {settings.records_redis_url: self.aredis}
        self._search = script(self.aredis, "queue_search")
        self._scan = script(self.aredis, "queue_scan")
        self._storage: Storage | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._io_limiter: anyio.CapacityLimiter | None = None

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """``func(*args)`` in a worker thread, at most ``gateway_threads`` at once.

        Submits, cancels and lists are a few Redis round trips each: a few threads keep
        a core busy, and more would only contend for the GIL.
        """
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.settings.gateway_threads)
        # A request past its deadline answers 504 at once; the thread finishes on its
        # own (a submit it completes is found again by its idempotency key).
        return await anyio.to_thread.run_sync(
            func, *args, limiter=self._limiter, abandon_on_cancel=True
        )

    async def run_io(self, func: Callable[..., T], *args: Any) -> T:
        """``func(*args)`` in a thread of its own pool: storage calls (an S3 upload can
        take a while) never hold up submits."""
        if self._io_limiter is None:
            self._io_limiter = anyio.CapacityLimiter(_IO_THREADS)
        return await anyio.to_thread.run_sync(
            func, *args, limiter=self._io_limiter, abandon_on_cancel=True
        )

    def warm(self) -> None:
        """Make the Celery producers now, in one thread, not racing in the first requests."""
        for long_jobs in (False, True):
            self.client._app(long_jobs)

    async def close(self) -> None:
        await self.hub.close()
        for client in self._brokers.values():
            await client.aclose()
        self.client.close()

    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = open_storage(self.settings)
        return self._storage

    def channel(self, job_id: str) -> str:
        return self.store.channel(job_id)

    async def read(self, job_id: str) -> JobRecord | None:
        raw = await self.aredis.get(self.store.keys.job(job_id))
        return None if raw is None else JobRecord.model_validate_json(raw)

    async def owned(self, tenant: str, job_id: str) -> JobRecord:
        """The tenant's job; another tenant's answers exactly as an unknown id does."""
        record = await self.read(job_id) if len(job_id) <= 64 else None
        if record is None or record.tenant != tenant:
            raise JobNotFound(f"id: no job {job_id!r}")
        return record

    async def queue_position(self, record: JobRecord) -> int | None:
        """Messages a worker takes before this queued job's; None when not known."""
        spec = JOB_KINDS.get(record.kind)
        if spec is None or record.status != JobStatus.QUEUED:
            return None
        url = self.settings.long_broker_url if spec.long_job else self.settings.broker_url
        if url not in self._brokers:
            self._brokers[url] = _async_redis(url)
        lists = priority_lists(job_queue(record.kind, self.settings.queue_prefix))
        broker = self._brokers[url]
        found = -2
        if url == self.settings.records_redis_url:
            # The records' index is in the same database: the binary search can read it.
            found = int(await self._search(keys=[*lists, self.store.keys.jobs()], args=[record.id]))
        if found == -2:
            found = int(
                await self._scan(
                    keys=lists,
                    args=[json.dumps(record.id), self.settings.gateway_queue_scan_max],
                    client=broker,
                )
            )
        if found == -2:
            return 0
        return None if found < 0 else found
