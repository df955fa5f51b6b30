"""A run's state transitions, one Redis round trip each.

A job's record used to be read, re-read and written with WATCH/GET/MULTI/EXEC for every
change: some 23 round trips per job. Here each transition is one Lua script that reads
what it must decide on and writes everything that changes together, atomically:

- ``claim``: create the record if a raw message brought none, read record and document,
  refuse a final, canceled or unserved job, take the lease and join the running set;
- ``start``: compare-and-set from the record ``claim`` read to the running one;
- ``write``: progress, or the final record (with the lease checked, and taken back if it
  lapsed while the job is still this run's, as ``LeaseKeeper`` does, and ``result.json``
  claimed), only while the record is this run's attempt;
- ``release``: the once-only claims of the side effects just done, leave the running
  set, give the lease up; folded into the final ``write`` when no side effect is left
  to do after it (no final webhook to send).

Scripts decide by reading the record (``cjson``), but never re-encode it: every record
written is the JSON Python made, so Lua's number and empty-table quirks never reach a
record. Python keeps the record as this run last wrote it (``RunRecord``): only the run
holding a job's attempt ever changes a running record (a cancel is a key of its own; a
newer attempt is refused by the scripts), so nothing needs reading back.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from api_client.records import Document, RecordStore, utcnow
from api_client.schemas import JobRecord
from api_client.usage import CHARGE_LUA, UsageLedger

_FINAL = (
    "local s = rec['status']\nlocal final = s == 'succeeded' or s == 'failed' or s == 'canceled'"
)

# KEYS: job, doc, cancel, lease, running, jobs index, channel, tenant index
# ARGV: record, document, ttl_s, now, job id, token, lease ttl ms, running score,
#       served (1/0), tenant (1/0)
_CLAIM = f"""
local raw = redis.call('GET', KEYS[1])
local doc = redis.call('GET', KEYS[2])
if (not raw or not doc) and ARGV[1] == '' then return {{'missing', '', ''}} end
if not raw then
  raw = ARGV[1]
  redis.call('SET', KEYS[1], raw, 'EX', ARGV[3])
  redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
  redis.call('ZADD', KEYS[6], ARGV[4], ARGV[5])
  if ARGV[10] == '1' then redis.call('ZADD', KEYS[8], ARGV[4], ARGV[5]) end
  redis.call('PUBLISH', KEYS[7], raw)
  doc = ARGV[2]
end
if not doc then
  doc = ARGV[2]
  redis.call('SET', KEYS[2], doc, 'EX', ARGV[3])
end
local rec = cjson.decode(raw)
{_FINAL}
if final then return {{'final', raw, doc}} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {{'canceled', raw, doc}} end
if ARGV[9] ~= '1' then return {{'unserved', raw, doc}} end
if not redis.call('SET', KEYS[4], ARGV[6], 'NX', 'PX', ARGV[7]) then
  if redis.call('GET', KEYS[4]) ~= ARGV[6] then return {{'held', raw, doc}} end
end
redis.call('ZADD', KEYS[5], ARGV[8], ARGV[5])
return {{'leased', raw, doc}}
"""

# KEYS: job, channel. ARGV: the record as read, the new record, ttl_s
_START = """
local raw = redis.call('GET', KEYS[1])
if raw ~= ARGV[1] then return {'changed', raw or ''} end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return {'ok', ''}
"""

#: The once-hash field a run that lost its job sets after it wrote result.json anyway
#: (it stalled between its lease check and the write): the run that ends the job writes
#: result.json again after its final record, so the file never disagrees with it.
STALE_RESULT = "result.json:stale"

# KEYS: job, channel, lease, once, running, usage day, usage tenants
# ARGV: new record, ttl_s, attempt, token, lease ttl ms, final (1/0), claim
#       result.json (1/0), now, release (1/0), job id, kind, model_s, usage keep s,
#       usage tenant, claims...
# A final write charges the job's usage (once per job, CHARGE_LUA); one that finds the
# stale mark claims and releases nothing else ('rewrite').
_WRITE = f"""
local STALE = '{STALE_RESULT}'
{CHARGE_LUA}
local raw = redis.call('GET', KEYS[1])
if not raw then return {{'gone', ''}} end
local rec = cjson.decode(raw)
{_FINAL}
if final then return {{'final', raw}} end
if rec['status'] ~= 'running' or tostring(rec['attempt']) ~= ARGV[3] then
  return {{'moved', raw}}
end
if ARGV[6] == '1' then
  local holder = redis.call('GET', KEYS[3])
  if holder ~= ARGV[4] then
    if holder then return {{'lost', raw}} end
    redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5])
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[1])
if ARGV[6] == '1' then
  charge(KEYS[4], KEYS[6], KEYS[7], ARGV[8], ARGV[11], ARGV[12], ARGV[13], ARGV[14], ARGV[2])
end
if ARGV[6] == '1' and redis.call('HDEL', KEYS[4], STALE) == 1 then
  return {{'rewrite', ''}}
end
if ARGV[7] == '1' then
  redis.call('HSETNX', KEYS[4], 'result.json', ARGV[8])
  redis.call('EXPIRE', KEYS[4], ARGV[2])
end
if ARGV[9] == '1' then
  for i = 15, #ARGV do redis.call('HSETNX', KEYS[4], ARGV[i], ARGV[8]) end
  redis.call('EXPIRE', KEYS[4], ARGV[2])
  redis.call('ZREM', KEYS[5], ARGV[10])
  redis.call('DEL', KEYS[3])
end
return {{'ok', ''}}
"""

# KEYS: running, lease, once. ARGV: job id, token, ttl_s, now, claims...
_RELEASE = """
for i = 5, #ARGV do redis.call('HSETNX', KEYS[3], ARGV[i], ARGV[4]) end
if #ARGV >= 5 then redis.call('EXPIRE', KEYS[3], ARGV[3]) end
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
return 1
"""


class Written(StrEnum):
    """What a ``write`` found."""

    #: Written.
    OK = "ok"
    #: Written (a final record), but a run that lost the job wrote its result.json since
    #: this run did: write it again, then claim it and let go of the job.
    REWRITE = "rewrite"
    #: Not written: the job is final already (another run ended it).
    FINAL = "final"
    #: Not written: another attempt runs the job now.
    MOVED = "moved"
    #: Not written: another run holds the job's lease.
    LOST = "lost"
    #: Not written: the record expired.
    GONE = "gone"


@dataclass
class Claimed:
    """What ``claim`` found: ``state`` is final, canceled, unserved, held or leased."""

    state: str
    record: JobRecord
    raw: str
    document: Document


@dataclass
class RunRecord:
    """The record as this run last wrote it, and its job's stored document."""

    record: JobRecord
    document: Document
    token: str
    #: Once-only side effects done since the final record, claimed at ``release``.
    claims: list[str] = field(default_factory=list)
    #: Out of the running set and the lease given up (with the final record).
    released: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class Transitions:
    """The scripts bound to one worker's record store."""

    def __init__(self, store: RecordStore) -> None:
        self.store = store
        self.settings = store.settings
        self.usage = UsageLedger(store)
        redis = store.redis
        self._claim = redis.register_script(_CLAIM)
        self._start = redis.register_script(_START)
        self._write = redis.register_script(_WRITE)
        self._release = redis.register_script(_RELEASE)

    @property
    def _lease_ms(self) -> int:
        return int(self.settings.lease_ttl_s * 1000)

    def claim(
        self, make_record: Callable[[], JobRecord], document: Document, token: str, *, served: bool
    ) -> Claimed:
        """``make_record``/``document``: what to create should the message have none (a raw
        Celery message by task name); made only then, on a second call."""
        claimed = self._call_claim(document, token, served, None)
        if claimed is None:
            claimed = self._call_claim(document, token, served, make_record())
        assert claimed is not None
        return claimed

    def _call_claim(
        self, document: Document, token: str, served: bool, record: JobRecord | None
    ) -> Claimed | None:
        key, job_id = self.store.key, str(document["id"])
        now = time.time()
        tenant = document.get("tenant") if isinstance(document.get("tenant"), str) else None
        state, raw, doc = self._claim(
            keys=[
                key("job", job_id),
                key("doc", job_id),
                key("cancel", job_id),
                key("lease", job_id),
                key("running"),
                key("jobs"),
                self.store.channel(job_id),
                self.store.index(tenant) if tenant is not None else key("jobs"),
            ],
            args=[
                "" if record is None else json.dumps(record.to_json()),
                "" if record is None else json.dumps(document),
                self.settings.result_ttl_s,
                now,
                job_id,
                token,
                self._lease_ms,
                now + self.settings.lease_ttl_s,
                "1" if served else "0",
                "1" if tenant is not None else "0",
            ],
        )
        if state == "missing":
            return None
        return Claimed(str(state), JobRecord.model_validate_json(raw), str(raw), json.loads(doc))

    def start(self, job_id: str, expected: str, new: JobRecord) -> str | None:
        """Set ``new`` if the record still reads ``expected``; else the record now."""
        state, raw = self._start(
            keys=[self.store.key("job", job_id), self.store.channel(job_id)],
            args=[expected, json.dumps(new.to_json()), self.settings.result_ttl_s],
        )
        return None if state == "ok" else str(raw)

    def write(
        self,
        run: RunRecord,
        new: JobRecord,
        *,
        final: bool = False,
        result_written: bool = False,
        release: list[str] | None = None,
    ) -> tuple[Written, JobRecord | None]:
        """Write ``new`` while the record is this run's attempt (``final``: and the lease
        is this run's). Returns what it found, and the record (the one found when not
        written).

        ``release`` (with ``final``): also claim these once-only names, leave the running
        set and give the lease up, as ``release`` does."""
        job_id = new.id
        key = self.store.key
        # Only a final write charges usage; a progress write names the keys unused.
        charge = self.usage.charge_of(new)
        state, raw = self._write(
            keys=[
                key("job", job_id),
                self.store.channel(job_id),
                key("lease", job_id),
                key("once", job_id),
                key("running"),
                charge.day_key,
                charge.tenants_key,
            ],
            args=[
                json.dumps(new.to_json()),
                self.settings.result_ttl_s,
                run.record.attempt,
                run.token,
                self._lease_ms,
                "1" if final else "0",
                "1" if result_written else "0",
                utcnow(),
                "1" if final and release is not None else "0",
                job_id,
                charge.kind,
                repr(charge.model_s),
                charge.keep_s,
                charge.tenant,
                *(release or ()),
            ],
        )
        written = Written(state)
        if written in (Written.OK, Written.REWRITE):
            run.record = new
            return written, new
        return written, JobRecord.model_validate_json(raw) if raw else None

    def mark_result_stale(self, job_id: str) -> None:
        """This run wrote result.json but its job is not its own any more (``STALE_RESULT``)."""
        key = self.store.key("once", job_id)
        pipe = self.store.redis.pipeline(transaction=True)
        pipe.hset(key, STALE_RESULT, utcnow())
        pipe.expire(key, self.settings.result_ttl_s)
        pipe.execute()

    def take_stale_mark(self, job_id: str) -> bool:
        """Whether a run that lost the job wrote result.json late (the mark is removed)."""
        return bool(self.store.redis.hdel(self.store.key("once", job_id), STALE_RESULT))

    def release(self, job_id: str, token: str, claims: list[str]) -> None:
        """The claims, then out of the running set, then the lease (if still ours)."""
        key = self.store.key
        self._release(
            keys=[key("running"), key("lease", job_id), key("once", job_id)],
            args=[job_id, token, self.settings.result_ttl_s, utcnow(), *claims],
        )


def stored_webhook(document: Document) -> dict[str, Any] | None:
    webhook = document.get("webhook")
    return webhook if isinstance(webhook, dict) else None
