"""``/v1/jobs``: submit, read, list, cancel, wait and follow a tenant's jobs.

Every route authenticates first and answers only about the token's tenant: another
tenant's job id is a 404, word for word the answer to an id that never existed.
Submits go through ``Client.submit_once`` in a worker thread (Celery's producer is
synchronous); reads use the event loop's own Redis connection.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sse_starlette import EventSourceResponse
from starlette.responses import JSONResponse, Response

from imageq.api_client.errors import ForbiddenUrl, InputFetchFailed, InvalidInput
from imageq.api_client.kinds import JOB_KINDS, KINDS
from imageq.api_client.object_urls import MAX_PREVIEW_BYTES, hide_storage_root, preview_key
from imageq.api_client.records import decode_cursor
from imageq.api_client.references import check_references
from imageq.api_client.schemas import JobRecord, JobStatus, parse_input
from imageq.gateway.errors import (
    InFlightLimit,
    Malformed,
    RateLimited,
    Unauthorized,
    UnsupportedMediaType,
    retry_after,
)
from imageq.gateway.models import SUBMIT_FIELDS, JobOut, JobPage, errors, submit_body_schema
from imageq.gateway.state import Gateway
from imageq.gateway.stream import job_events, wait_final
from imageq.gateway.tokens import Tenant
from imageq.workers.io.netguard import check_url

router = APIRouter(prefix="/v1", tags=["jobs"])

# A keep-alive comment this often keeps proxies from closing a quiet event stream.
_PING_S = 15

#: What the OpenAPI document says of every route that needs a token. The token is read
#: by ``authenticate``, called first in each route, not by a FastAPI dependency: on the
#: submit path, dependency solving cost as much CPU as the Redis calls.
SECURED: dict[str, Any] = {"security": [{"bearer": []}]}
SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "a tenant's token: `imageq tokens create TENANT`",
    }
}


def gateway(request: Request) -> Gateway:
    state: Gateway = request.app.state.gateway
    return state


async def authenticate(request: Request) -> Tenant:
    """The token's tenant, or 401 for a missing, wrong or revoked token."""
    tenant = await gateway(request).auth.tenant(request.headers.get("authorization"))
    if tenant is None:
        raise Unauthorized("a valid token is required: Authorization: Bearer TOKEN")
    # Read by the guard middleware for the metrics' tenant label.
    request.state.tenant = tenant.name
    return tenant


# -- request parsing ----------------------------------------------------------------


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def parse_body(raw: bytes, content_type: str | None, max_depth: int) -> dict[str, Any]:
    """A submit body: a JSON object, no deeper than ``max_depth``, known fields only."""
    media = (content_type or "application/json").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type: send application/json, not {media!r}")
    if not raw.strip():
        raise Malformed("body: a JSON object is required")
    try:
        data = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        raise Malformed(f"body: nested deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise Malformed(f"body: not valid JSON ({type(exc).__name__})") from None
    if json_depth(data) > max_depth:
        raise Malformed(f"body: nested deeper than {max_depth} levels")
    if not isinstance(data, dict):
        raise InvalidInput(f"body: a JSON object is required, not {type(data).__name__}")
    unknown = sorted(set(data) - SUBMIT_FIELDS)
    if unknown:
        raise InvalidInput(
            f"{unknown[0]}: unknown field; a job has {', '.join(sorted(SUBMIT_FIELDS))}"
        )
    return data


def prefer_wait(header: str | None, cap_s: float) -> float | None:
    """Seconds of ``Prefer: wait=N`` (RFC 7240), capped; None when not asked for."""
    for part in (header or "").replace(";", ",").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                return None  # a preference the server does not understand is ignored
            if seconds != seconds or seconds <= 0:  # NaN or nothing to wait for
                return None
            return min(seconds, cap_s)
    return None


def check_input_refs(gw: Gateway, tenant: str, kind: Any, inp: Any) -> None:
    """What the tenant's job names, refused here as the worker would refuse it (the
    same walker and rule: api_client.references); an input that does not parse is left
    to the submit, which names its problems."""
    if not isinstance(kind, str) or kind not in JOB_KINDS:
        return
    try:
        model = parse_input(kind, inp)
    except InvalidInput:
        return
    try:
        check_references(model, tenant, gw.grants.grants(tenant))
    except ForbiddenUrl as exc:
        # Named as the caller named it: `image` is shorthand for a one-image `images`.
        shorthand = "input.images[0]:"
        if isinstance(inp, dict) and "image" in inp and exc.message.startswith(shorthand):
            raise ForbiddenUrl("input.image:" + exc.message[len(shorthand) :]) from None
        raise


def _check_webhook(webhook: Any, gw: Gateway) -> None:
    """The SSRF guard workers use, at submit: a refused URL never becomes a job."""
    url = webhook.get("url") if isinstance(webhook, dict) else webhook
    if not isinstance(url, str):
        return  # not a URL at all: parse_job names the problem
    try:
        check_url(url, gw.settings)
    except ForbiddenUrl as exc:
        raise ForbiddenUrl(f"webhook.url: {exc.message}") from None
    except InputFetchFailed as exc:
        raise InvalidInput(f"webhook.url: {exc.message}") from None


def submit_sync(
    gw: Gateway, tenant: str, body: dict[str, Any], key: str | None
) -> tuple[JobRecord, bool]:
    """Limits, checks and the submit itself, in one worker thread."""
    # A replayed key creates nothing, so it takes no room in flight (and gets its job
    # back even when the tenant is at its cap).
    priority = body.get("priority", 5)
    # Before the limits: a refused submit spends no rate. (A priority that is no
    # integer at all is parse_job's to name.)
    if isinstance(priority, int) and not isinstance(priority, bool):
        cap = gw.caps.over(tenant, priority)
        if cap is not None:
            raise InvalidInput(f"priority: {priority} is over this tenant's maximum of {cap}")
    job_id = gw.client.job_id_for(key, tenant)
    replay = key is not None and gw.store.get(job_id) is not None
    admission = gw.limits.admit(tenant, None if replay else job_id)
    if admission.retry_after_s is not None:
        raise RateLimited(
            f"over this tenant's submit rate; retry in {admission.retry_after_s:.2f} s",
            retry_after(admission.retry_after_s),
        )
    if admission.full_at is not None:
        raise InFlightLimit(
            f"this tenant has {admission.full_at} jobs in flight, its limit; retry when one ends",
            retry_after(1),
        )
    try:
        # After the limits: a flood of bad requests is refused before any DNS lookup.
        check_input_refs(gw, tenant, body.get("kind"), body.get("input"))
        _check_webhook(body.get("webhook"), gw)
        return gw.client.submit_once(
            body.get("kind"),  # type: ignore[arg-type]  # parse_job checks every field
            body.get("input"),  # type: ignore[arg-type]
            webhook=body.get("webhook"),
            idempotency_key=key,
            priority=priority,
            timeout_s=body.get("timeout_s"),
            metadata=body.get("metadata"),
            tenant=tenant,
            job_id=None if key is not None else job_id,
        )
    except BaseException:
        if not replay:
            gw.limits.release(tenant, job_id)
        raise


async def read_preview(gw: Gateway, job_id: str) -> bytes | None:
    """The job's latest step preview, from its own ``jobs/{id}/`` prefix (a tenant's
    stream only follows its own jobs); None when it cannot be read now."""
    try:
        return await gw.run_io(gw.storage().get, preview_key(job_id), MAX_PREVIEW_BYTES)
    except Exception:  # a missing or unreadable preview skips the event, not the stream
        return None


def render(record: JobRecord, root: str) -> dict[str, Any]:
    """A record as its tenant sees it: ``storage://`` refs, not the storage root."""
    shown: dict[str, Any] = hide_storage_root(record.to_json(), root)
    return shown


# -- routes -------------------------------------------------------------------------

_SUBMIT_DOC = {
    **SECURED,
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": submit_body_schema()}},
    },
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "description": "a second submit with this key returns the first job (200); "
            "with another document, 409",
            "schema": {"type": "string", "minLength": 1, "maxLength": 256},
        },
        {
            "name": "Prefer",
            "in": "header",
            "required": False,
            "description": "wait=N: hold the answer until the job ends, up to N s (N <= 60)",
            "schema": {"type": "string", "maxLength": 256},
        },
    ],
}


@router.post(
    "/jobs",
    status_code=201,
    response_model=JobOut,
    responses={
        200: {"model": JobOut, "description": "an idempotency key replayed: the first job"},
        **errors(400, 401, 409, 413, 415, 422, 429, 431, 503, 504),
    },
    openapi_extra=_SUBMIT_DOC,
    summary="Submit a job",
)
async def submit_job(request: Request) -> Response:
    tenant = await authenticate(request)
    gw = gateway(request)
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= 256:
        raise InvalidInput("Idempotency-Key: 1 to 256 characters")
    raw = await request.body()
    body = parse_body(raw, request.headers.get("content-type"), gw.settings.gateway_max_json_depth)
    record, created = await gw.run(submit_sync, gw, tenant.name, body, key)
    headers = {"Location": f"/v1/jobs/{record.id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    seconds = prefer_wait(request.headers.get("prefer"), gw.settings.gateway_max_wait_s)
    if seconds is not None:
        record = await wait_final(gw.hub, gw.channel(record.id), gw.read, record, seconds)
        headers["Preference-Applied"] = f"wait={seconds:g}"
    return JSONResponse(
        render(record, gw.storage_root), status_code=201 if created else 200, headers=headers
    )


@router.get(
    "/jobs",
    response_model=JobPage,
    responses=errors(400, 401, 422, 431, 503, 504),
    summary="List the tenant's jobs, newest first",
    openapi_extra=SECURED,
)
async def list_jobs(
    request: Request,
    status: JobStatus | None = None,
    kind: Annotated[str | None, Query(json_schema_extra={"enum": list(KINDS)})] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Response:
    tenant = await authenticate(request)
    if kind is not None and kind not in KINDS:
        raise InvalidInput(f"kind: expected one of {', '.join(KINDS)}")
    if cursor is not None:
        try:
            decode_cursor(cursor)
        except InvalidInput as exc:
            # Unreadable, as a body that is not JSON is: 400, naming the cursor.
            raise Malformed(exc.message) from None
    gw = gateway(request)
    records, next_cursor = await gw.run(
        gw.client.list_page, status, kind, limit, cursor, tenant.name
    )
    return JSONResponse(
        {"data": [render(r, gw.storage_root) for r in records], "next_cursor": next_cursor}
    )


@router.get(
    "/jobs/{job_id}",
    response_model=JobOut,
    responses=errors(401, 404, 431, 503, 504),
    summary="A job's record (with queue_position while queued)",
    openapi_extra=SECURED,
)
async def get_job(request: Request, job_id: str) -> Response:
    tenant = await authenticate(request)
    gw = gateway(request)
    record = await gw.owned(tenant.name, job_id)
    data = render(record, gw.storage_root)
    if record.status == JobStatus.QUEUED:
        data["queue_position"] = await gw.queue_position(record)
    return JSONResponse(data)


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobOut,
    responses=errors(401, 404, 431, 503, 504),
    summary="Cancel a job in any state",
    openapi_extra=SECURED,
)
async def cancel_job(request: Request, job_id: str) -> Response:
    tenant = await authenticate(request)
    gw = gateway(request)
    await gw.owned(tenant.name, job_id)
    record = await gw.run(gw.client.cancel, job_id)
    return JSONResponse(render(record, gw.storage_root))


@router.get(
    "/jobs/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "`progress` events (the record) on each change, `preview` events "
            "(a diffusion step preview), then one `done` "
            "event (the final record); the stream then closes",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **errors(401, 404, 431, 503),
    },
    summary="Follow a job as server-sent events",
    openapi_extra=SECURED,
)
async def job_event_stream(request: Request, job_id: str) -> Response:
    tenant = await authenticate(request)
    gw = gateway(request)
    await gw.owned(tenant.name, job_id)
    events = job_events(
        gw.hub,
        gw.channel(job_id),
        gw.read,
        job_id,
        gw.settings.gateway_stream_max_s,
        lambda record: render(record, gw.storage_root),
        lambda job: read_preview(gw, job),
    )
    return EventSourceResponse(
        events,
        ping=_PING_S,
        # Proxies must pass events through as they come (nginx buffers otherwise).
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
