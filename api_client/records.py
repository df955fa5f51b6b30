"""Job records in Redis: the single source of truth for a job's state.

Producers create records; workers move them through their states. Every change is an
optimistic transaction (WATCH/MULTI) that also publishes the new record on the job's
channel, so a waiting client wakes at once instead of polling.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import redis

from imageq.api_client.errors import ImageqError, InvalidInput
from imageq.api_client.keys import Keys
from imageq.api_client.schemas import ErrorRecord, JobRecord, JobStatus
from imageq.api_client.settings import Settings

#: A job document as stored (JSON): what a redelivery or a re-dispatch sends again.
Document = dict[str, Any]
#: Changes a copy of the record; returns it, or None to change nothing.
Mutation = Callable[[JobRecord], JobRecord | None]
#: A job id as the job document allows it (schemas.JobDocument.id).
_ID = re.compile(r"[A-Za-z0-9-]{1,64}\Z")


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def connect(url: str, max_connections: int | None = None) -> redis.Redis:
    """A Redis client that reconnects on its own after a Redis restart.

    Without ``max_connections``, one connection per thread that talks to Redis at once,
    as many as that (redis-py 8 caps a pool at 100 and then *fails* the call, and a
    gateway holds one per waiting client). With it, at most that many: a thread waits
    for a free one, so a worker with hundreds of job threads (a pool sized for batches
    of 256) keeps a bounded number of Redis clients.
    """
    options: dict[str, Any] = {
        "decode_responses": True,
        "health_check_interval": 15,
        "socket_keepalive": True,
        "retry_on_timeout": True,
    }
    if max_connections is None:
        return redis.Redis.from_url(url, max_connections=2**31, **options)
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=30, **options
    )
    client = redis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True
    return client


class RecordStore:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.ns = f"imageq:{settings.queue_prefix}"
        #: Every key this deployment uses (the schema: ``api_client/keys.py``).
        self.keys = Keys(self.ns)
        #: Called with a job id when this process requests a cancel (a worker's cancel
        #: set hears other processes' cancels on the ``cancels`` channel).
        self.cancel_listeners: list[Callable[[str], None]] = []

    # -- keys -------------------------------------------------------------------------

    def channel(self, job_id: str) -> str:
        return self.keys.updates(job_id)

    # -- reads ------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.get(self.keys.job(job_id))
        return None if raw is None else JobRecord.model_validate_json(raw)

    def get_document(self, job_id: str) -> Document | None:
        raw = self.redis.get(self.keys.doc(job_id))
        return None if raw is None else json.loads(raw)

    def index(self, tenant: str | None = None) -> str:
        """The sorted set of job ids by creation time: all jobs, or one tenant's."""
        return self.keys.jobs() if tenant is None else self.keys.tenant_jobs(tenant)

    def list_ids(self, limit: int = 100, tenant: str | None = None) -> list[str]:
        """Newest first; entries whose record expired are pruned on the way."""
        index = self.index(tenant)
        self.redis.zremrangebyscore(index, "-inf", time.time() - self.settings.result_ttl_s)
        return [str(i) for i in self.redis.zrevrange(index, 0, max(0, limit - 1))]

    def page_ids(
        self, tenant: str | None, after: tuple[float, str] | None, count: int
    ) -> list[tuple[str, float]]:
        """Up to ``count`` (id, created) pairs, newest first, strictly after ``after``.

        A (score, id) position rather than an offset: jobs submitted while a client
        pages through do not shift the pages it has yet to read.
        """
        index = self.index(tenant)
        if after is None:
            self.redis.zremrangebyscore(index, "-inf", time.time() - self.settings.result_ttl_s)
            rows: Any = self.redis.zrevrange(index, 0, max(0, count - 1), withscores=True)
            return [(str(m), float(s)) for m, s in rows]
        score, last = after
        # Inclusive of the position's score, then members sharing it are told apart by id
        # (Redis orders equal scores by member, descending, in a reverse range).
        spare = 64
        rows = self.redis.zrevrangebyscore(
            index, repr(score), "-inf", start=0, num=count + spare, withscores=True
        )
        out = [
            (str(m), float(s))
            for m, s in rows
            if float(s) < score or (float(s) == score and str(m) < last)
        ]
        return out[:count]

    def iter_records(self, limit: int = 100, tenant: str | None = None) -> Iterator[JobRecord]:
        ids = self.list_ids(limit, tenant)
        yield from self.records(ids, tenant)

    def records(self, ids: list[str], tenant: str | None = None) -> Iterator[JobRecord]:
        """The records of ``ids`` in order; ids whose record expired leave the index."""
        if not ids:
            return
        raws = self.redis.mget([self.keys.job(i) for i in ids])
        for job_id, raw in zip(ids, raws, strict=True):
            if raw is None:
                self.redis.zrem(self.index(tenant), job_id)
                continue
            yield JobRecord.model_validate_json(raw)

    def fingerprint(self, job_id: str) -> str | None:
        """The hash of the document an idempotent job was created with (see ``create``)."""
        value = self.redis.get(self.keys.fingerprint(job_id))
        return None if value is None else str(value)

    # -- writes -----------------------------------------------------------------------
    def create(
        self, record: JobRecord, document: Document, fingerprint: str | None = None
    ) -> tuple[JobRecord, bool]:
        """Store a new record unless one exists; returns (record, created).

        ``fingerprint`` (a hash of an idempotent job's document) is kept beside the
        record, written before it, so whoever finds the record finds the fingerprint.
        """
        ttl = self.settings.result_ttl_s
        key = self.keys.job(record.id)
        fingerprint_key = self.keys.fingerprint(record.id)
        if fingerprint is not None:
            self.redis.set(fingerprint_key, fingerprint, nx=True, ex=ttl)
        encoded = json.dumps(record.to_json())
        if not self.redis.set(key, encoded, nx=True, ex=ttl):
            existing = self.get(record.id)
            if existing is not None:
                return existing, False
            self.redis.set(key, encoded, ex=ttl)
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        if fingerprint is not None:
            # Ours now, even over a stale one left by an expired job of the same key.
            pipe.set(fingerprint_key, fingerprint, ex=ttl)
        pipe.set(self.keys.doc(record.id), json.dumps(document), ex=ttl)
        pipe.zadd(self.keys.jobs(), {record.id: now})
        if record.tenant is not None:
            pipe.zadd(self.index(record.tenant), {record.id: now})
        pipe.publish(self.channel(record.id), encoded)
        pipe.execute()
        return record, True

    def delete(self, job_id: str, tenant: str | None = None) -> None:
        self.redis.delete(
            self.keys.job(job_id), self.keys.doc(job_id), self.keys.fingerprint(job_id)
        )
        self.redis.zrem(self.keys.jobs(), job_id)
        if tenant is not None:
            self.redis.zrem(self.index(tenant), job_id)

    def save_document(self, job_id: str, document: Document) -> None:
        self.redis.set(self.keys.doc(job_id), json.dumps(document), ex=self.settings.result_ttl_s)

    def update(self, job_id: str, mutate: Mutation) -> tuple[JobRecord | None, bool]:
        """Apply ``mutate`` atomically; it returns the new record or None for no change.

        Returns (record after the call, whether this call changed it).
        """
        key = self.keys.job(job_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        pipe.unwatch()
                        return None, False
                    current = JobRecord.model_validate_json(raw)
                    new = mutate(current.model_copy(deep=True))
                    if new is None:
                        pipe.unwatch()
                        return current, False
                    encoded = json.dumps(new.to_json())
                    pipe.multi()
                    pipe.set(key, encoded, ex=self.settings.result_ttl_s)
                    pipe.publish(self.channel(job_id), encoded)
                    pipe.execute()
                    return new, True
                except redis.WatchError:
                    continue

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        output: dict[str, Any] | None = None,
        error: ImageqError | None = None,
    ) -> tuple[JobRecord | None, bool]:
        """Move a job to a final status once; a second call changes nothing."""

        def mutate(rec: JobRecord) -> JobRecord | None:
            if rec.is_final:
                return None
            return final_record(rec, status, output=output, error=error)

        return self.update(job_id, mutate)

    def replace_unless_final(self, job_id: str, final: JobRecord) -> tuple[JobRecord | None, bool]:
        """Store a final record computed beforehand, unless the job already ended."""
        return self.update(job_id, lambda rec: None if rec.is_final else final)

    # -- cancel -----------------------------------------------------------------------
    def request_cancel(self, job_id: str) -> None:
        self.redis.set(self.keys.cancel(job_id), "1", ex=self.settings.result_ttl_s)
        self.redis.publish(self.keys.cancels(), job_id)
        for listener in list(self.cancel_listeners):
            listener(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.keys.cancel(job_id)))


def encode_cursor(position: tuple[float, str]) -> str:
    """A page position (created, id) as an opaque, URL-safe cursor."""
    raw = json.dumps([repr(position[0]), position[1]]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The position ``encode_cursor`` made; anything else is ``InvalidInput`` (a NaN or
    an infinity would reach Redis as a score it refuses: a 500, not the caller's 400)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        score, job_id = json.loads(raw)
        position = float(score)
    except (ValueError, TypeError):
        position, job_id = math.nan, None
    if not math.isfinite(position) or not isinstance(job_id, str) or not _ID.match(job_id):
        raise InvalidInput("cursor: not a cursor this API returned")
    return position, job_id


def new_record(document: Document, *, now: str | None = None) -> JobRecord:
    """The record of a job that has just been accepted (DESIGN §4)."""
    return JobRecord(
        id=document["id"],
        kind=document["kind"],
        status=JobStatus.QUEUED,
        created_at=now or utcnow(),
        metrics={"queue_s": None, "run_s": None},
        metadata=document.get("metadata") or {},
        tenant=document.get("tenant"),
    )


def final_record(
    record: JobRecord,
    status: JobStatus,
    *,
    output: dict[str, Any] | None = None,
    error: ImageqError | None = None,
) -> JobRecord:
    """The record as it will read once final (pure: nothing is stored)."""
    rec = record.model_copy(deep=True)
    rec.status = status
    rec.output = output
    rec.error = None if error is None else ErrorRecord(code=error.code, message=error.message)
    rec.finished_at = utcnow()
    started = parse_time(rec.started_at)
    if started is not None:
        rec.metrics = {**rec.metrics, "run_s": round(time.time() - started, 4)}
    return rec
