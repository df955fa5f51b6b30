"""Per-tenant limits: a submit rate and a cap on jobs in flight, kept in Redis.

Both live in Redis, not in a gateway process, so any number of gateway replicas behind
a load balancer enforce one limit per tenant. Each check is one Lua script call, atomic
in Redis, and reads the tenant's own limits (``imageq tokens create --rate
--max-in-flight``) or the deployment's defaults. A limit of 0 means none.

- Rate: a token bucket (burst: one second's worth, at least one job), refilled by the
  Redis clock, so replicas with skewed clocks agree.
- In flight: a sorted set per tenant of its jobs that are not final yet; a submit adds
  its job's id before it enqueues (and takes it out again if the submit fails).
  Finished jobs are not removed when they finish (the gateway does not see that); they
  are swept lazily, only when the set looks full, by reading their records.

The in-flight cap is what keeps one flooding tenant from starving the others: queues
are first in, first out, so a tenant can only ever have its cap's worth waiting.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from imageq.api_client.records import RecordStore
from imageq.api_client.schemas import FINAL_STATUSES
from imageq.api_client.scripts import script
from imageq.api_client.settings import Settings

# An admitted job id with no record stops counting after this (its submit failed and
# its gateway died before it could say so).
SLOT_TTL_S = 120.0


class Limits:
    """The checks a submit makes (synchronous: they run in the submit's thread)."""

    def __init__(self, client: redis.Redis, store: RecordStore, settings: Settings) -> None:
        self.redis = client
        self.store = store
        self.settings = settings
        self._admit = script(client, "admit")

    def _keys(self, tenant: str, what: str = "jobs") -> list[str]:
        return [
            self.store.keys.gateway_rate(what, tenant),
            self.store.keys.gateway_tenant(tenant),
            self.store.keys.gateway_in_flight(tenant),
        ]

    def _call(self, tenant: str, what: str, slot: str) -> tuple[int, float]:
        verdict, value = self._admit(
            keys=self._keys(tenant, what),
            args=[
                self.settings.gateway_default_rate,
                self.settings.gateway_default_max_in_flight,
                slot,
                time.time(),
                self.settings.result_ttl_s,
            ],
        )
        return int(verdict), float(value)

    def take(self, tenant: str, what: str = "jobs") -> float:
        """Spend one of the tenant's rate: 0.0 if allowed, else seconds to wait.

        ``what`` names the bucket: submits and uploads each get the tenant's rate, so
        uploading a job's image does not halve how many jobs it may submit.
        """
        verdict, value = self._call(tenant, what, "")
        return 0.0 if verdict == 1 else max(value, 0.001)

    def admit(self, tenant: str, job_id: str | None) -> Admission:
        """Rate and in-flight checks for one submit, as one Redis call; ``job_id`` (the
        id the job will have) is counted in flight from here on.

        ``job_id=None`` (an idempotency key replayed: nothing new is made) checks the
        rate only.
        """
        slot = job_id or ""
        verdict, value = self._call(tenant, "jobs", slot)
        if verdict == 2:
            # Full as far as the set knows: sweep the jobs that have finished, then ask
            # once more. A tenant below its cap never pays for the sweep.
            self.sweep(tenant)
            verdict, value = self._call(tenant, "jobs", slot)
        if verdict == 0:
            return Admission(retry_after_s=max(value, 0.001))
        if verdict == 2:
            return Admission(full_at=int(value))
        return Admission()

    def release(self, tenant: str, job_id: str) -> None:
        """The submit of ``job_id`` failed: it is not in flight after all."""
        self.redis.zrem(self._keys(tenant)[2], job_id)

    def sweep(self, tenant: str) -> int:
        """Drop the tenant's jobs that are final (or gone) from its in-flight set."""
        inflight = self._keys(tenant)[2]
        rows: Any = self.redis.zrange(inflight, 0, -1, withscores=True)
        members = [(str(m), float(s)) for m, s in rows]
        if not members:
            return 0
        now, stale = time.time(), []
        raws = self.redis.mget([self.store.keys.job(job_id) for job_id, _ in members])
        for (job_id, admitted), raw in zip(members, raws, strict=True):
            if raw is None:
                # No record: expired, or a submit that never finished (its gateway
                # died), or one still between admit and its record: give it time.
                if now - admitted > SLOT_TTL_S:
                    stale.append(job_id)
            elif json.loads(raw).get("status") in FINAL_STATUSES:
                stale.append(job_id)
        if stale:
            self.redis.zrem(inflight, *stale)
        return len(members) - len(stale)


@dataclass(frozen=True)
class Admission:
    """One submit's verdict: go, or why it must wait."""

    retry_after_s: float | None = None
    full_at: int | None = None

    @property
    def allowed(self) -> bool:
        return self.retry_after_s is None and self.full_at is None
