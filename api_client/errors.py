"""One error hierarchy for the whole system.

The class says whether a failure is worth another try; the ``code`` is the public
contract (DESIGN §4). Errors cross process boundaries as ``{"code", "message"}``
records (``to_record`` / ``from_record``), never as pickles.
"""

from __future__ import annotations

from typing import Any, ClassVar

ERROR_CODES = (
    "invalid_input",
    "input_fetch_failed",
    "forbidden_url",
    "model_error",
    "out_of_memory",
    "timeout",
    "worker_lost",
    "canceled",
    "internal",
    # Submit only (never a job's error): the idempotency key was used for another document.
    "idempotency_conflict",
)


class ImageqError(Exception):
    """Base of every error imageq raises on purpose."""

    code: ClassVar[str] = "internal"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_record(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    @staticmethod
    def from_record(record: dict[str, Any]) -> ImageqError:
        cls = ERRORS_BY_CODE.get(str(record.get("code")), InternalError)
        return cls(str(record.get("message", "")))

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidInput(ImageqError):
    code = "invalid_input"


class InputFetchFailed(ImageqError):
    code = "input_fetch_failed"


class ForbiddenUrl(ImageqError):
    code = "forbidden_url"


class ModelError(ImageqError):
    code = "model_error"


class OutOfMemory(ImageqError):
    code = "out_of_memory"


class JobTimeout(ImageqError):
    code = "timeout"


class WorkerLost(ImageqError):
    code = "worker_lost"


class Canceled(ImageqError):
    code = "canceled"


class InternalError(ImageqError):
    code = "internal"


class TransientError(ImageqError):
    """A dependency (storage, network) failed in a way another try may fix.

    Retried with backoff a bounded number of times, then reported as ``internal``.
    """

    code = "internal"
    retryable = True


class IdempotencyConflict(ImageqError):
    """A submit reused an idempotency key with a different job document (Stripe's rule:
    one key, one request); the first job stands, unchanged."""

    code = "idempotency_conflict"


class NotFound(ImageqError):
    """A job or adapter id that the records do not know (client side only)."""

    code = "invalid_input"


ERRORS_BY_CODE: dict[str, type[ImageqError]] = {
    cls.code: cls
    for cls in (
        InvalidInput,
        InputFetchFailed,
        ForbiddenUrl,
        ModelError,
        OutOfMemory,
        JobTimeout,
        WorkerLost,
        Canceled,
        InternalError,
        IdempotencyConflict,
    )
}
