"""A job's keys as only workers touch them: its lease and its once-only side effects.

The producer's store (``imageq.api_client.records.RecordStore``) creates, reads, lists and
cancels records; what a run holds while it works (the lease) and what a job's end owes
once (``result.json``, the final webhook, its count) are the workers' business and live
here. The scripts that move a record between states are ``transitions``.
"""

from __future__ import annotations

from imageq.api_client.records import RecordStore, utcnow
from imageq.api_client.scripts import script


class JobState:
    def __init__(self, store: RecordStore) -> None:
        self.store = store
        self.redis = store.redis
        self.keys = store.keys
        self.settings = store.settings

    # -- leases: no two workers run one job at once ----------------------------------
    def acquire_lease(self, job_id: str, token: str) -> bool:
        ttl_ms = int(self.settings.lease_ttl_s * 1000)
        key = self.keys.lease(job_id)
        if self.redis.set(key, token, nx=True, px=ttl_ms):
            return True
        # The same worker may get its own job back (a retry of this delivery).
        return self.redis.get(key) == token

    def renew_lease(self, job_id: str, token: str) -> bool:
        key = self.keys.lease(job_id)
        ttl_ms = int(self.settings.lease_ttl_s * 1000)
        return bool(script(self.redis, "renew_lease")(keys=[key], args=[token, ttl_ms]))

    def release_lease(self, job_id: str, token: str) -> None:
        script(self.redis, "release_lease")(keys=[self.keys.lease(job_id)], args=[token])

    def lease_holder(self, job_id: str) -> str | None:
        value = self.redis.get(self.keys.lease(job_id))
        return None if value is None else str(value)

    # -- once-only side effects (result.json, the final webhook, the count) -----------
    def claim_once(self, job_id: str, what: str) -> bool:
        """True for exactly one caller per (job, what) within the record's lifetime."""
        key = self.keys.once(job_id)
        claim = script(self.redis, "claim_once")
        return bool(claim(keys=[key], args=[what, utcnow(), self.settings.result_ttl_s]))

    def done_once(self, job_id: str, what: str) -> bool:
        return bool(self.redis.hexists(self.keys.once(job_id), what))

    def forget_once(self, job_id: str, what: str) -> None:
        self.redis.hdel(self.keys.once(job_id), what)
