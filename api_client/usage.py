"""Model time by tenant, job kind and day: what each tenant's jobs cost the fleet.

A job's ``metrics.model_s`` is the time the model worked for it: its share of every
micro-batched call its items were in (split by cost, so the shares of one call add up
to the call's measured time), the whole run for a fine-tune. When a job ends, its model
time and one job are added to its tenant's day (the UTC day of ``finished_at``), once
per job however many workers finish or complete it: the claim is a field of the job's
once-only hash, in the same script as the sums (lua/charge.lua, included by every
script that ends a job).

Keys: ``usage:{tenant}:{day}`` (a hash of ``{kind}.jobs`` and ``{kind}.model_s``), kept
``IMAGEQ_USAGE_KEEP_DAYS``; ``usage-tenants`` (the set of tenants with usage, for the
operator's view). Jobs submitted without a tenant (a backend's own ``Client``) count
under ``-``, which no tenant name can be.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from imageq.api_client.records import RecordStore, utcnow
from imageq.api_client.schemas import JobRecord
from imageq.api_client.scripts import script

#: The usage tenant of jobs that no gateway tenant submitted.
NO_TENANT = "-"


@dataclass(frozen=True)
class UsageRow:
    """One tenant's jobs of one kind on one day."""

    tenant: str
    day: str
    kind: str
    jobs: int
    model_s: float


@dataclass(frozen=True)
class Charge:
    """What ending ``record`` adds to its tenant's usage, and where."""

    day_key: str
    tenants_key: str
    kind: str
    model_s: float
    tenant: str
    keep_s: int


def usage_tenant(record: JobRecord) -> str:
    return record.tenant or NO_TENANT


def job_day(record: JobRecord) -> str:
    """The UTC day a job is counted on: the day it ended (now, if it has not)."""
    ended = record.finished_at or utcnow()
    return ended[:10]


class UsageLedger:
    def __init__(self, store: RecordStore) -> None:
        self.store = store
        self.settings = store.settings

    def day_key(self, tenant: str, day: str) -> str:
        return self.store.keys.usage(tenant, day)

    @property
    def tenants_key(self) -> str:
        return self.store.keys.usage_tenants()

    def charge_of(self, record: JobRecord) -> Charge:
        tenant = usage_tenant(record)
        return Charge(
            day_key=self.day_key(tenant, job_day(record)),
            tenants_key=self.tenants_key,
            kind=record.kind,
            model_s=float(record.metrics.get("model_s") or 0.0),
            tenant=tenant,
            keep_s=self.settings.usage_keep_days * 86400,
        )

    def charge(self, record: JobRecord) -> bool:
        """Count a final job once (True: this call counted it)."""
        c = self.charge_of(record)
        counted = script(self.store.redis, "charge_job")(
            keys=[self.store.keys.once(record.id), c.day_key, c.tenants_key],
            args=[
                utcnow(),
                c.kind,
                repr(c.model_s),
                c.keep_s,
                c.tenant,
                self.settings.result_ttl_s,
            ],
        )
        return bool(counted)

    def tenants(self) -> list[str]:
        return sorted(str(t) for t in self.store.redis.smembers(self.tenants_key))

    def rows(self, tenant: str | None = None, since: date | None = None) -> list[UsageRow]:
        """Usage since ``since`` (default: 30 days ago), oldest day first, of one tenant
        or (None) of every tenant; at most ``IMAGEQ_USAGE_KEEP_DAYS`` days back."""
        today = datetime.now(UTC).date()
        oldest = today - timedelta(days=self.settings.usage_keep_days)
        first = max(since or today - timedelta(days=30), oldest)
        days = [(first + timedelta(days=n)).isoformat() for n in range((today - first).days + 1)]
        tenants = [tenant] if tenant is not None else self.tenants()
        pairs = [(t, d) for t in tenants for d in days]
        pipe = self.store.redis.pipeline(transaction=False)
        for t, d in pairs:
            pipe.hgetall(self.day_key(t, d))
        rows: list[UsageRow] = []
        for (t, d), fields in zip(pairs, pipe.execute(), strict=True):
            kinds = sorted({name.rsplit(".", 1)[0] for name in fields})
            rows.extend(
                UsageRow(
                    tenant=t,
                    day=d,
                    kind=k,
                    jobs=int(fields.get(f"{k}.jobs") or 0),
                    model_s=round(float(fields.get(f"{k}.model_s") or 0.0), 6),
                )
                for k in kinds
            )
        return rows
