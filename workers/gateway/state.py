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

from api_client.client import Client
from api_client.kinds import JOB_KINDS
from api_client.names import job_queue
from api_client.queues import priority_lists
from api_client.records import RecordStore
from api_client.schemas import JobRecord, JobStatus
from api_client.settings import Settings
from api_client.tenant_caps import PriorityCaps
from workers.gateway.errors import JobNotFound
from workers.gateway.limits import Limits
from workers.gateway.metrics import GatewayMetrics
from workers.gateway.tokens import Authenticator
from workers.gateway.updates import UpdateHub
from workers.io.storage import Storage, open_storage

T = TypeVar("T")
# Uploads and storage health checks at once per process.
_IO_THREADS = 16

# Where a queued job's message is, found inside Redis at a cost that does not grow with
# the queue. kombu LPUSHes and workers BRPOP, so each list runs newest (head) to oldest
# (tail), the order of the jobs' creation times in the records' index: a binary search
# by that time finds the message in about log2(length) LINDEX calls. Lists ahead of the
# one holding it count whole.
# KEYS: the queue's lists (most urgent first), then the records' index of jobs.
# ARGV[1]: the job id. Returns the messages ahead of it, or -2 when not found this way
# (no creation time, or a message re-sent out of order): then _SCAN_LUA looks.
_SEARCH_LUA = """
local index = KEYS[#KEYS]
local mine = tonumber(redis.call('ZSCORE', index, ARGV[1]))
if not mine then return -2 end
local function at(list, i)
  local item = redis.call('LINDEX', list, i)
  if not item then return nil, nil end
  local id = string.match(item, '"id": "([%w%-]+)"')
  if not id then
    local ok, message = pcall(cjson.decode, item)
    if ok and type(message) == 'table' and type(message.headers) == 'table' then
      id = message.headers.id
    end
  end
  if not id then return nil, nil end
  return tonumber(redis.call('ZSCORE', index, id)), id
end
local ahead = 0
for k = 1, #KEYS - 1 do
  local list = KEYS[k]
  local n = redis.call('LLEN', list)
  if n > 0 then
    local lo, hi = 0, n
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      local created, id = at(list, mid)
      if id == ARGV[1] then return ahead + (n - 1 - mid) end
      -- Unknown times count as newer: a raw producer's message not recorded yet.
      if created == nil or created >= mine then lo = mid + 1 else hi = mid end
    end
    for _, i in ipairs({lo - 1, lo}) do
      if i >= 0 and i < n then
        local _, id = at(list, i)
        if id == ARGV[1] then return ahead + (n - 1 - i) end
      end
    end
    ahead = ahead + n
  end
end
return -2
"""

# The fallback: a scan from the end workers take from, at most ARGV[2] messages.
# Returns the messages ahead, -1 when the budget ran out first, -2 when the message is
# in none of the lists (a worker holds it: it is next).
_SCAN_LUA = """
local budget = tonumber(ARGV[2])
local ahead = 0
for _, name in ipairs(KEYS) do
  local length = redis.call('LLEN', name)
  local seen = 0
  while seen < length do
    if budget <= 0 then return -1 end
    local take = math.min(100, length - seen, budget)
    local items = redis.call('LRANGE', name, -(seen + take), -(seen + 1))
    for j = #items, 1, -1 do
      if string.find(items[j], ARGV[1], 1, true) then
        return ahead + seen + (#items - j)
      end
    end
    seen = seen + take
    budget = budget - take
  end
  ahead = ahead + length
end
return -2
"""


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
        self.limits = Limits(self.client.redis, self.store, settings)
        self.caps = PriorityCaps(self.client.redis, self.store)
        self.hub = UpdateHub(self.aredis, self.store.key("gw", "hub"))
        self.metrics = metrics or GatewayMetrics()
        self._brokers: dict[str, aioredis.Redis] = {settings.records_redis_url: self.aredis}
        self._search = self.aredis.register_script(_SEARCH_LUA)
        self._scan = self.aredis.register_script(_SCAN_LUA)
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
        raw = await self.aredis.get(self.store.key("job", job_id))
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
            found = int(await self._search(keys=[*lists, self.store.key("jobs")], args=[record.id]))
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
