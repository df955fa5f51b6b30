"""Internal errors: a code and an error id for the tenant, the detail for operators.

A job that fails ``internal`` records "internal error (error id ID)" in its record,
result.json and webhooks; what went wrong (exception type, text, traceback: paths,
endpoints, bucket names) goes to the worker's log under the same id and to Redis,
``imageq:{prefix}error:{ID}``, for as long as the job's record lives
(``IMAGEQ_RESULT_TTL_S``). Operators read it with ``imageq errors show ID`` or
``Client.error_detail(ID)``; the gateway never serves it.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import traceback
from typing import Any

import redis

from imageq.api_client.errors import ImageqError, InternalError
from imageq.api_client.records import RecordStore, utcnow

log = logging.getLogger("imageq.errors")

#: What a tenant reads of an internal error.
_MESSAGE = "internal error (error id {})"
_REPORTED = re.compile(r"internal error \(error id [0-9a-f]{12}\)\Z")
# Kept per error: a traceback's last frames say where; the rest is in the log.
_MAX_TEXT = 2000
_MAX_TRACEBACK = 8000


def is_reported(message: str) -> bool:
    """Whether ``message`` is already an error id's message (nothing left to hide)."""
    return _REPORTED.match(message) is not None


class ErrorDetails:
    def __init__(self, store: RecordStore) -> None:
        self.store = store

    def report(self, exc: BaseException, job_id: str | None = None) -> InternalError:
        """Log ``exc`` with its traceback under a fresh error id, keep its detail for
        operators, and return the error the job records."""
        error_id = secrets.token_hex(6)
        text = exc.message if isinstance(exc, ImageqError) else str(exc)
        log.error(
            "job %s: internal error %s: %s: %s",
            job_id,
            error_id,
            type(exc).__name__,
            text,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        detail = {
            "error_id": error_id,
            "job_id": job_id,
            "type": type(exc).__name__,
            "message": text[:_MAX_TEXT],
            "traceback": "".join(traceback.format_exception(exc))[-_MAX_TRACEBACK:],
            "at": utcnow(),
        }
        try:
            self.store.redis.set(
                self.store.keys.error(error_id),
                json.dumps(detail),
                ex=self.store.settings.result_ttl_s,
            )
        except redis.RedisError as unkept:
            # The log has it all; the job must still end with its error id.
            log.warning("error %s: detail not kept in Redis: %s", error_id, type(unkept).__name__)
        return InternalError(_MESSAGE.format(error_id))

    def get(self, error_id: str) -> dict[str, Any] | None:
        """The detail kept for ``error_id``; None when unknown or expired."""
        if not re.fullmatch(r"[0-9a-f]{12}", error_id):
            return None
        raw = self.store.redis.get(self.store.keys.error(error_id))
        return None if raw is None else dict(json.loads(raw))
