"""``/v1/usage``: a tenant's own model time by kind and day (api_client/usage.py)."""

from __future__ import annotations

from datetime import date
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response

from imageq.api_client.errors import InvalidInput
from imageq.api_client.usage import UsageLedger
from imageq.gateway.jobs import SECURED, authenticate, gateway
from imageq.gateway.models import errors

router = APIRouter(prefix="/v1", tags=["usage"])


class UsageDay(BaseModel):
    day: str
    kind: str
    jobs: int
    #: Seconds the model worked for these jobs (their shares of the batches they ran in).
    model_s: float


class UsagePage(BaseModel):
    data: list[UsageDay]


def parse_since(value: str | None) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"since: {value!r} is not a date (YYYY-MM-DD)") from None


@router.get(
    "/usage",
    response_model=UsagePage,
    responses=errors(400, 401, 422),
    summary="The tenant's model time by kind and day (UTC), oldest first",
    openapi_extra=SECURED,
)
async def usage(
    request: Request,
    since: Annotated[
        str | None, Query(description="first day, YYYY-MM-DD (default 30 days ago)")
    ] = None,
) -> Response:
    tenant = await authenticate(request)
    first = parse_since(since)
    gw = gateway(request)
    rows = await gw.run(UsageLedger(gw.store).rows, tenant.name, first)
    data = [{"day": r.day, "kind": r.kind, "jobs": r.jobs, "model_s": r.model_s} for r in rows]
    return JSONResponse({"data": data})
