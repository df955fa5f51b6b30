"""Errors as HTTP answers: always ``{"error": {"code", "message", "field"?}}``.

The one error hierarchy (``imageq.api_client.errors``) says what went wrong; this module says
which status that is. The few failures that exist only over HTTP (a missing token, a
body too large, a tenant over its limits) are ``ImageqError`` subclasses here, so one
handler answers them all. Nothing a client sends may end in a 500 with a stack trace:
unexpected exceptions are logged here, with an error id, and answered with that id.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
from typing import Any, ClassVar

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from kombu.exceptions import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from imageq.api_client.errors import (
    ForbiddenUrl,
    IdempotencyConflict,
    ImageqError,
    InputFetchFailed,
    InvalidInput,
    TransientError,
)
from imageq.gateway.openai_compat import is_openai_path, openai_error

log = logging.getLogger("imageq.gateway")

# A field path as describe_validation_error writes it: input.images[0], webhook.url.
_FIELD = re.compile(r"^([A-Za-z_][\w-]*(?:\[\d+\]|\.[A-Za-z_][\w-]*)*): ")


class HttpError(ImageqError):
    """A failure that only exists over HTTP; ``status`` is its answer."""

    status: ClassVar[int] = 400

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers or {}


class Malformed(InvalidInput):
    """The request is not even readable: bad JSON, a bad header (400, not 422)."""


class Unauthorized(HttpError):
    code = "unauthorized"
    status = 401


class JobNotFound(HttpError):
    code = "not_found"
    status = 404


class PayloadTooLarge(HttpError):
    code = "payload_too_large"
    status = 413


class UnsupportedMediaType(HttpError):
    code = "unsupported_media_type"
    status = 415


class HeadersTooLarge(HttpError):
    code = "headers_too_large"
    status = 431


class RateLimited(HttpError):
    code = "rate_limited"
    status = 429


class InFlightLimit(HttpError):
    code = "in_flight_limit"
    status = 429


class Unavailable(HttpError):
    code = "unavailable"
    status = 503


class GatewayTimeout(HttpError):
    code = "timeout"
    status = 504


#: Redis errors that mean "not now" rather than "wrong".
REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
)


def retry_after(seconds: float) -> dict[str, str]:
    """A Retry-After header: whole seconds (RFC 9110), at least one."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def status_for(exc: ImageqError) -> int:
    if isinstance(exc, HttpError):
        return exc.status
    if isinstance(exc, IdempotencyConflict):
        return 409
    if isinstance(exc, Malformed):
        return 400
    if isinstance(exc, InvalidInput | ForbiddenUrl | InputFetchFailed):
        return 422
    if isinstance(exc, TransientError):
        return 503
    return 500


def field_of(message: str) -> str | None:
    """The field a message names first (``input.images[0]: ...``), if any."""
    match = _FIELD.match(message)
    if match is None or match.group(1) == "document":
        return None
    return match.group(1)


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return {"error": error}


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    path: str = "",
) -> Response:
    """The error answer; on the OpenAI-compatible routes (``path``), in OpenAI's shape."""
    if is_openai_path(path):
        status, body = openai_error(status, code, message, field)
        return JSONResponse(body, status_code=status, headers=headers)
    return JSONResponse(error_body(code, message, field), status_code=status, headers=headers)


def internal_response(exc: BaseException, where: str = "", path: str = "") -> Response:
    """A 500: an error id for the caller, the exception under that id in the log
    (``path``: the request's, for the error's shape)."""
    error_id = secrets.token_hex(6)
    log.error(
        "internal error %s%s: %s",
        error_id,
        f" on {where}" if where else "",
        type(exc).__name__,
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    return error_response(500, "internal", f"internal error (error id {error_id})", path=path)


def response_for(exc: ImageqError, path: str = "") -> Response:
    status = status_for(exc)
    if status == 500:
        return internal_response(exc, path=path)
    if status == 503 and not isinstance(exc, HttpError):
        # A dependency's own words (a bucket, an endpoint, botocore's text) stay in the
        # log; the caller learns only that it may retry.
        log.warning("unavailable: %s: %s", type(exc).__name__, exc.message)
        return error_response(
            503,
            "unavailable",
            "a dependency is unavailable; retry shortly",
            None,
            retry_after(1),
            path,
        )
    headers = dict(getattr(exc, "headers", {}) or {})
    if status == 401:
        headers.setdefault("WWW-Authenticate", 'Bearer realm="imageq"')
    if status == 503:
        headers.update(retry_after(1))
    # ForbiddenUrl and friends keep their own code; an unresolvable webhook host is
    # the caller's input, so it reads invalid_input; a dependency that failed for now
    # (storage) reads unavailable, as Redis being away does.
    code = exc.code
    if isinstance(exc, InputFetchFailed):
        code = "invalid_input"
    elif status == 503:
        code = "unavailable"
    return error_response(status, code, exc.message, field_of(exc.message), headers, path)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, first = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("query", "path", "header")]
        field = ".".join(loc) or None
        first = first or field
        parts.append(f"{field or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", first


_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def install(app: FastAPI) -> None:
    """Every error the app can raise, answered in the one error format."""

    @app.exception_handler(ImageqError)
    async def _imageq(request: Request, exc: ImageqError) -> Response:
        return response_for(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        # FastAPI checks parameters before the route's token check runs: a request with
        # no valid token hears 401 first, whatever else is wrong with it.
        if request.url.path.startswith("/v1/"):
            # Here, not at the top: the routes' module imports this one.
            from imageq.gateway.jobs import authenticate

            try:
                await authenticate(request)
            except Unauthorized as denied:
                return response_for(denied, request.url.path)
        message, field = _validation_message(exc)
        return error_response(422, "invalid_input", message, field, path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = _HTTP_CODES.get(exc.status_code, "invalid_input")
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        headers = dict(exc.headers or {})
        return error_response(exc.status_code, code, detail, headers=headers, path=request.url.path)

    async def _redis(request: Request, exc: Exception) -> Response:
        # Redis away, loading its data, or a replica that cannot write: the client may
        # retry shortly. (Any other Redis error is a bug: the catch-all's 500.)
        log.warning("redis unavailable: %s", type(exc).__name__)
        return error_response(
            503,
            "unavailable",
            "the job store is unavailable; retry shortly",
            headers=retry_after(1),
            path=request.url.path,
        )

    for unavailable in REDIS_UNAVAILABLE:
        app.add_exception_handler(unavailable, _redis)

    @app.exception_handler(OperationalError)
    async def _broker(request: Request, exc: OperationalError) -> Response:
        log.warning("broker unavailable: %s", type(exc).__name__)
        return error_response(
            503,
            "unavailable",
            "the job queue is unavailable; retry shortly",
            headers=retry_after(1),
            path=request.url.path,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # Logged with its traceback for the operator; the client learns only its id.
        return internal_response(exc, f"{request.method} {request.url.path}", request.url.path)
