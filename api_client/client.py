"""The producer side: submit jobs, read and wait for their records, cancel them."""

from __future__ import annotations

import builtins
import hashlib
import json
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from imageq.api_client.adapters import adapter_field, visible
from imageq.api_client.celery_config import celery_config
from imageq.api_client.error_details import ErrorDetails
from imageq.api_client.errors import IdempotencyConflict, InvalidInput, JobTimeout, NotFound
from imageq.api_client.job_ids import IdSecret, job_id_for
from imageq.api_client.kinds import JOB_KINDS
from imageq.api_client.names import (
    FINALIZE_TASK,
    WEBHOOK_QUEUE,
    WEBHOOK_TASK,
    celery_priority,
    job_queue,
    queue_name,
    task_name,
)
from imageq.api_client.object_urls import MAX_PREVIEW_BYTES, preview_key, with_fresh_urls
from imageq.api_client.queue_scan import record_from_queue
from imageq.api_client.records import (
    RecordStore,
    connect,
    decode_cursor,
    encode_cursor,
    new_record,
    utcnow,
)
from imageq.api_client.redact import redact_document
from imageq.api_client.schemas import ErrorRecord, JobRecord, JobStatus, parse_job
from imageq.api_client.settings import Settings
from imageq.api_client.uploads import (
    IMAGE_TYPES,
    get_object,
    put_object,
    sniff_format,
    storage_ref,
    upload_key,
)
from imageq.api_client.usage import UsageLedger, UsageRow
from imageq.api_client.webhook_log import KeptDelivery, KeptOutcome, WebhookLog

OnUpdate = Callable[[JobRecord], None]
_DOCUMENT_OPTIONS = ("webhook", "idempotency_key", "priority", "timeout_s", "metadata")
# The most jobs one list_page call looks at when filters skip most of them.
_PAGE_SCAN = 1000


class Client:
    """Talks to Redis (records) and the broker (jobs). Connections open lazily."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self._redis: redis.Redis | None = None
        self._apps: dict[bool, Celery] = {}
        self._id_secret: IdSecret | None = None

    # -- plumbing ---------------------------------------------------------------------
    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = connect(self.settings.records_redis_url)
        return self._redis

    @property
    def store(self) -> RecordStore:
        return RecordStore(self.redis, self.settings)

    def job_id_for(self, idempotency_key: str | None, tenant: str | None = None) -> str:
        """The id a submit with this key (and tenant) gets: the same from every producer
        of the deployment, and not computable without its id secret (job_ids.py)."""
        if idempotency_key and tenant is not None:
            if self._id_secret is None:
                secret = self.settings.id_secret.get_secret_value()
                self._id_secret = IdSecret(secret, self.redis, self.store.keys.id_secret())
            return job_id_for(idempotency_key, tenant, self._id_secret.get())
        return job_id_for(idempotency_key, tenant)

    def _app(self, long_jobs: bool) -> Celery:
        if long_jobs not in self._apps:
            app = Celery("imageq-client", set_as_current=False)
            app.conf.update(celery_config(self.settings, long_jobs=long_jobs))
            self._apps[long_jobs] = app
        return self._apps[long_jobs]

    def close(self) -> None:
        for app in self._apps.values():
            app.close()
        self._apps.clear()
        if self._redis is not None:
            self._redis.close()
            self._redis = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- submit -----------------------------------------------------------------------
    def submit(
        self,
        kind: str,
        input: dict[str, Any],
        *,
        webhook: str | dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        priority: int = 5,
        timeout_s: float | None = None,
        metadata: dict[str, Any] | None = None,
        tenant: str | None = None,
    ) -> JobRecord:
        """Validate, record and enqueue a job; a repeated idempotency key returns the first.

        Reusing a key with a different document raises ``IdempotencyConflict``.
        """
        record, _ = self.submit_once(
            kind,
            input,
            webhook=webhook,
            idempotency_key=idempotency_key,
            priority=priority,
            timeout_s=timeout_s,
            metadata=metadata,
            tenant=tenant,
        )
        return record

    def submit_once(
        self,
        kind: str,
        input: dict[str, Any],
        *,
        webhook: str | dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        priority: int = 5,
        timeout_s: float | None = None,
        metadata: dict[str, Any] | None = None,
        tenant: str | None = None,
        job_id: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """``submit``, also saying whether this call created the job (False: a replay of
        an idempotency key, which returns the first job as it stands now).

        ``job_id`` names a job without an idempotency key beforehand (a fresh uuid4),
        for a caller that must know it before the job exists: the gateway counts it
        in its tenant's jobs in flight first.
        """
        if job_id is not None and idempotency_key is not None:
            raise InvalidInput("id: derives from idempotency_key; give one or the other")
        document: dict[str, Any] = {
            "id": job_id or self.job_id_for(idempotency_key, tenant),
            "kind": kind,
            "input": input,
            "priority": priority,
            "metadata": metadata or {},
        }
        if tenant is not None:
            document["tenant"] = tenant
        if webhook is not None:
            document["webhook"] = {"url": webhook} if isinstance(webhook, str) else webhook
            if not self.settings.webhook_secret:
                raise InvalidInput("webhook: IMAGEQ_WEBHOOK_SECRET is not set; webhooks are off")
        if idempotency_key is not None:
            document["idempotency_key"] = idempotency_key
        if timeout_s is not None:
            document["timeout_s"] = timeout_s
        doc = parse_job(document).wire()
        fingerprint = None if idempotency_key is None else document_fingerprint(doc)
        record, created = self.store.create(new_record(doc), doc, fingerprint)
        if not created:
            stored = self.store.fingerprint(doc["id"])
            # No fingerprint: a job from before fingerprints, or a raw producer's.
            if fingerprint is not None and stored is not None and stored != fingerprint:
                raise IdempotencyConflict(
                    "idempotency_key: already used for a different job document "
                    f"(job {doc['id']}); use a new key for a new job"
                )
            return record, False
        try:
            self._app(JOB_KINDS[kind].long_job).send_task(
                task_name(kind),
                args=[doc],
                task_id=doc["id"],
                queue=job_queue(kind, self.settings.queue_prefix),
                priority=celery_priority(doc["priority"]),
                # Flower and logs show this instead of the document: no inline images.
                argsrepr=json.dumps([redact_document(doc)]),
            )
        except Exception:
            self.store.delete(doc["id"], tenant)
            raise
        return record, True

    def _kind(self, kind: str, fields: dict[str, Any], **named: Any) -> JobRecord:
        """Job-document options (webhook, priority, ...) apart, the rest is the input."""
        options = {k: fields.pop(k) for k in _DOCUMENT_OPTIONS if k in fields}
        inp = {k: v for k, v in named.items() if v is not None}
        inp.update(fields)
        return self.submit(kind, inp, **options)

    def caption(self, image: str | None = None, **fields: Any) -> JobRecord:
        return self._kind("caption", fields, image=image)

    def match(self, image: str | None = None, **fields: Any) -> JobRecord:
        return self._kind("match", fields, image=image)

    def generate(self, prompt: str, **fields: Any) -> JobRecord:
        return self._kind("generate", fields, prompt=prompt)

    def inpaint(self, image: str, mask: str, prompt: str, **fields: Any) -> JobRecord:
        return self._kind("inpaint", fields, image=image, mask=mask, prompt=prompt)

    def style(self, image: str, **fields: Any) -> JobRecord:
        return self._kind("style", fields, image=image)

    def finetune(self, target: str, dataset: str, name: str, **fields: Any) -> JobRecord:
        return self._kind("finetune", fields, target=target, dataset=dataset, name=name)

    # -- read -------------------------------------------------------------------------
    def get(self, job_id: str, *, presign: bool = False) -> JobRecord:
        """The job's record; with ``presign``, every stored S3 file (and result.json)
        gets a freshly signed URL valid for ``IMAGEQ_PRESIGN_TTL_S``."""
        record = self.store.get(job_id) or self._from_queue(job_id)
        if record is None:
            raise NotFound(f"id: no job {job_id!r} (unknown, or expired after the result TTL)")
        if presign:
            return with_fresh_urls(record, self.settings.presign_ttl_s)
        return record

    def _from_queue(self, job_id: str) -> JobRecord | None:
        """A job another Celery client enqueued, not picked up yet: recorded now."""
        return record_from_queue(self.store, self.redis, job_id)

    def preview(self, job_id: str) -> bytes | None:
        """The job's latest step preview (a JPEG, ``progress.preview``); None if none."""
        return get_object(self.settings, preview_key(job_id), MAX_PREVIEW_BYTES)

    def wait(
        self, job_id: str, timeout_s: float | None = None, on_update: OnUpdate | None = None
    ) -> JobRecord:
        """Block until the job is final, woken by the job's pub/sub channel (no polling).

        Raises ``JobTimeout`` if ``timeout_s`` passes first.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.store.channel(job_id))
        try:
            # Read after subscribing so an update between the two is never missed.
            record = self.get(job_id)
            while True:
                if on_update is not None:
                    on_update(record)
                if record.is_final:
                    return record
                remaining = 30.0 if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    raise JobTimeout(f"job {job_id} not final after {timeout_s} s")
                message = pubsub.get_message(timeout=min(remaining, 30.0))
                if message is not None and message.get("type") == "message":
                    record = JobRecord.model_validate_json(message["data"])
                elif message is None:
                    # A quiet channel: re-read in case this connection missed a message.
                    record = self.get(job_id)
        finally:
            pubsub.close()

    def list(
        self,
        status: str | None = None,
        kind: str | None = None,
        limit: int = 100,
        tenant: str | None = None,
    ) -> builtins.list[JobRecord]:
        """Newest first, filtered by status and kind, from the last ``limit`` jobs (of
        one gateway tenant's jobs when ``tenant`` is given)."""
        out = []
        for record in self.store.iter_records(limit, tenant):
            if status and record.status != status:
                continue
            if kind and record.kind != kind:
                continue
            out.append(record)
        return out

    def list_page(
        self,
        status: str | None = None,
        kind: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
        tenant: str | None = None,
    ) -> tuple[builtins.list[JobRecord], str | None]:
        """One page of jobs, newest first, and the cursor of the next (None: no more).

        Filters apply while paging, so a page may hold fewer than ``limit`` jobs when
        matches are rare (at most ``_PAGE_SCAN`` jobs are looked at per page).
        """
        after = None if cursor is None else decode_cursor(cursor)
        found: builtins.list[JobRecord] = []
        scanned = 0
        last: tuple[float, str] | None = None
        batch = max(limit, 50)
        while scanned < _PAGE_SCAN:
            rows = self.store.page_ids(tenant, after, batch)
            if not rows:
                return found, None
            created = dict(rows)
            for record in self.store.records([job_id for job_id, _ in rows], tenant):
                last = (created[record.id], record.id)
                if (status and record.status != status) or (kind and record.kind != kind):
                    continue
                found.append(record)
                if len(found) == limit:
                    return found, encode_cursor(last)
            scanned += len(rows)
            after = (rows[-1][1], rows[-1][0])
            if len(rows) < batch:
                return found, None
        return found, None if last is None else encode_cursor(after or last)

    # -- upload -----------------------------------------------------------------------
    def upload(
        self,
        path_or_bytes: str | Path | bytes,
        content_type: str | None = None,
        *,
        tenant: str | None = None,
    ) -> str:
        """Put an image in the deployment's storage; returns its ``storage://uploads/...``
        reference, usable in any image field of a job.

        The bytes must be a JPEG, PNG, WebP, GIF or BMP within ``IMAGEQ_MAX_IMAGE_BYTES``
        (workers check the pixel cap when they decode it).
        """
        if isinstance(path_or_bytes, bytes | bytearray):
            data = bytes(path_or_bytes)
        else:
            path = Path(path_or_bytes)
            if path.stat().st_size > self.settings.max_image_bytes:
                raise InvalidInput(
                    f"upload: larger than the limit of {self.settings.max_image_bytes} bytes"
                )
            data = path.read_bytes()
        if len(data) > self.settings.max_image_bytes:
            raise InvalidInput(
                f"upload: larger than the limit of {self.settings.max_image_bytes} bytes"
            )
        if content_type is not None and not content_type.lower().startswith("image/"):
            raise InvalidInput(f"upload: content type {content_type!r} is not an image type")
        fmt = sniff_format(data)
        if fmt is None:
            raise InvalidInput("upload: not a JPEG, PNG, WebP, GIF or BMP image")
        key = upload_key(fmt, tenant)
        put_object(self.settings, key, data, IMAGE_TYPES[fmt][0])
        return storage_ref(key)

    # -- cancel -----------------------------------------------------------------------
    def cancel(self, job_id: str) -> JobRecord:
        """Cancel in any state: a queued job ends now, a running one at its next step."""
        self.get(job_id)
        store = self.store
        store.request_cancel(job_id)
        _, changed = store.update(job_id, _cancel_if_queued)
        if changed:
            # result.json and the final webhook are written by the light webhooks worker,
            # so they do not wait for a GPU worker to reach the message.
            self._app(False).send_task(
                FINALIZE_TASK,
                args=[job_id],
                queue=queue_name(WEBHOOK_QUEUE, self.settings.queue_prefix),
            )
        return self.get(job_id)

    # -- webhooks ---------------------------------------------------------------------
    def failed_webhooks(
        self,
        outcome: KeptOutcome | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> builtins.list[KeptDelivery]:
        """Deliveries that failed for good (retries spent) or were refused with 410."""
        return WebhookLog(self.store).listing(outcome=outcome, since=since, limit=limit)

    def replay_webhooks(
        self,
        webhook_id: str | None = None,
        *,
        job_id: str | None = None,
        since: float | None = None,
    ) -> builtins.list[str]:
        """Send kept deliveries again (same webhook id, fresh signature); returns their ids."""
        log = WebhookLog(self.store)
        if webhook_id is not None:
            ids = [webhook_id]
        else:
            ids = [i for i, _ in log.entries(job_id=job_id, since=since, limit=10_000)]

        def send(event: dict[str, Any]) -> None:
            self._app(False).send_task(
                WEBHOOK_TASK,
                args=[event],
                queue=queue_name(WEBHOOK_QUEUE, self.settings.queue_prefix),
                argsrepr=json.dumps([{"webhook_id": event["webhook_id"], "replay": True}]),
            )

        # Each one stops being kept only once sent: a broker error leaves it (and those
        # after it) kept, for the next replay.
        return [kept_id for kept_id in ids if log.replay(kept_id, send)]

    # -- usage ------------------------------------------------------------------------
    def usage(
        self, tenant: str | None = None, since: date | None = None
    ) -> builtins.list[UsageRow]:
        """Model time by tenant, kind and day (UTC), oldest day first: one tenant's, or
        (None) every tenant's, since ``since`` (default 30 days ago)."""
        return UsageLedger(self.store).rows(tenant, since)

    # -- adapters ---------------------------------------------------------------------
    def error_detail(self, error_id: str) -> dict[str, Any] | None:
        """What an internal error's id stands for (operators only: paths, tracebacks)."""
        return ErrorDetails(self.store).get(error_id)

    def adapters(self, tenant: str | None = None) -> builtins.list[dict[str, Any]]:
        """Published adapters, newest first (the registry written by finetune jobs):
        ``tenant``'s own and the shared ones (``tenant`` None: every one, the operator's
        view). Each entry's ``tenant`` names its owner (None: shared)."""
        raw = self.redis.hgetall(self.store.keys.adapters())
        entries = visible((json.loads(v) for v in raw.values()), tenant)
        return sorted(entries, key=lambda e: str(e.get("created_at", "")), reverse=True)

    def delete_adapter(self, name: str, tenant: str | None = None) -> bool:
        """Remove ``tenant``'s own adapter ``name`` (None: the shared one) from the
        registry; False if there was none. Never another namespace's: a tenant cannot
        delete a shared adapter. Its files stay in storage (this client has no storage
        writer) until the name is published again, which prunes old revisions."""
        return bool(self.redis.hdel(self.store.keys.adapters(), adapter_field(name, tenant)))


def document_fingerprint(document: dict[str, Any]) -> str:
    """A hash of what a job asks for (its id aside, which the key derives), compared
    when an idempotency key comes back."""
    canonical = {k: v for k, v in document.items() if k != "id"}
    encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()


def _cancel_if_queued(record: JobRecord) -> JobRecord | None:
    if record.status != JobStatus.QUEUED:
        return None
    record.status = JobStatus.CANCELED
    record.finished_at = utcnow()
    record.error = ErrorRecord(code="canceled", message="canceled before it started")
    return record
