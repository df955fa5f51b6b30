"""A run's state transitions, one Redis round trip each.

A job's record used to be read, re-read and written with WATCH/GET/MULTI/EXEC for every
change: some 23 round trips per job. Here each transition is one Lua script
(``api_client/lua/NAME.lua``) that reads what it must decide on and writes everything
that changes together, atomically:

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

from imageq.api_client.records import Document, RecordStore, utcnow
from imageq.api_client.schemas import JobRecord
from imageq.api_client.scripts import script
from imageq.api_client.usage import UsageLedger


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


class ClaimState(StrEnum):
    """What a delivery's ``claim`` found (lua/claim.lua)."""

    #: The job ended already: complete what a crash may have skipped.
    FINAL = "final"
    #: Canceled before it started: ends ``canceled`` without running.
    CANCELED = "canceled"
    #: This worker does not serve the job's kind: ends ``invalid_input``.
    UNSERVED = "unserved"
    #: Another run holds the lease: look again later.
    HELD = "held"
    #: This delivery holds the lease now: it runs the job.
    LEASED = "leased"


@dataclass
class Claimed:
    """What ``claim`` found, and the record and document it read."""

    state: ClaimState
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
        self._claim = script(redis, "claim")
        self._start = script(redis, "start")
        self._write = script(redis, "write")
        self._release = script(redis, "release")

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
        keys, job_id = self.store.keys, str(document["id"])
        now = time.time()
        tenant = document.get("tenant") if isinstance(document.get("tenant"), str) else None
        state, raw, doc = self._claim(
            keys=[
                keys.job(job_id),
                keys.doc(job_id),
                keys.cancel(job_id),
                keys.lease(job_id),
                keys.running(),
                keys.jobs(),
                self.store.channel(job_id),
                self.store.index(tenant) if tenant is not None else keys.jobs(),
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
        return Claimed(
            ClaimState(state), JobRecord.model_validate_json(raw), str(raw), json.loads(doc)
        )

    def start(self, job_id: str, expected: str, new: JobRecord) -> str | None:
        """Set ``new`` if the record still reads ``expected``; else the record now."""
        state, raw = self._start(
            keys=[self.store.keys.job(job_id), self.store.channel(job_id)],
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
        keys = self.store.keys
        # Only a final write charges usage; a progress write names the keys unused.
        charge = self.usage.charge_of(new)
        state, raw = self._write(
            keys=[
                keys.job(job_id),
                self.store.channel(job_id),
                keys.lease(job_id),
                keys.once(job_id),
                keys.running(),
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

    def mark_result_stale(self, job_id: str) -> bool:
        """This run wrote result.json but its job is not its own any more (lua/stale.lua):
        marked, so whichever run ends the job writes result.json again; False when the
        job has ended already (the caller writes it again itself)."""
        mark = script(self.store.redis, "mark_stale")
        keys = [self.store.keys.job(job_id), self.store.keys.once(job_id)]
        return bool(mark(keys=keys, args=[utcnow(), self.settings.result_ttl_s]))

    def take_stale_mark(self, job_id: str) -> bool:
        """Whether a run that lost the job wrote result.json late (the mark is removed)."""
        return bool(script(self.store.redis, "take_stale")(keys=[self.store.keys.once(job_id)]))

    def release(self, job_id: str, token: str, claims: list[str]) -> None:
        """The claims, then out of the running set, then the lease (if still ours)."""
        keys = self.store.keys
        self._release(
            keys=[keys.running(), keys.lease(job_id), keys.once(job_id)],
            args=[job_id, token, self.settings.result_ttl_s, utcnow(), *claims],
        )


def stored_webhook(document: Document) -> dict[str, Any] | None:
    webhook = document.get("webhook")
    return webhook if isinstance(webhook, dict) else None
