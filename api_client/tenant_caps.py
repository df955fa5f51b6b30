"""A tenant's highest job priority (``imageq tokens create --max-priority``), as the
gateway checks it at submit and a worker checks it again when a tenant's job arrives
by another way (a Client or raw message that names the tenant).

Kept in the tenant's hash beside its other limits (``gw:tenant:{name}``, field
``max_priority``; absent: ``IMAGEQ_GATEWAY_DEFAULT_MAX_PRIORITY``). One Redis read per
tenant, remembered for ``IMAGEQ_GATEWAY_TOKEN_CACHE_S``: a changed cap takes effect that
long after, as a revoked token does.
"""

from __future__ import annotations

import threading
import time

import redis

from imageq.api_client.records import RecordStore

FIELD = "max_priority"


class PriorityCaps:
    # Tenants remembered at most; the cache starts over when full (tenants are few).
    MAX_CACHED = 10_000

    def __init__(self, client: redis.Redis, store: RecordStore) -> None:
        self.redis = client
        self.store = store
        self.default = store.settings.gateway_default_max_priority
        self.cache_s = store.settings.gateway_token_cache_s
        self._cache: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def max_priority(self, tenant: str) -> int:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(tenant)
        if cached is not None and cached[0] > now:
            return cached[1]
        raw = self.redis.hget(self.store.keys.gateway_tenant(tenant), FIELD)
        cap = self.default if raw is None else int(str(raw))
        with self._lock:
            if len(self._cache) >= self.MAX_CACHED:
                self._cache.clear()
            self._cache[tenant] = (now + self.cache_s, cap)
        return cap

    def over(self, tenant: str | None, priority: int) -> int | None:
        """The tenant's cap when ``priority`` is above it; None when allowed (and for a
        job without a tenant: its producer holds the Redis password)."""
        if tenant is None:
            return None
        cap = self.max_priority(tenant)
        return cap if priority > cap else None
