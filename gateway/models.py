"""The shapes the OpenAPI document shows: request bodies, answers and errors.

The request body of ``POST /v1/jobs`` is one schema per kind (its ``input`` is that
kind's own model from ``imageq.api_client.inputs``), so generated clients and fuzzers know each
kind's fields. Requests are still validated by ``imageq.api_client.schemas.parse_job``, the one
validation every producer gets, which names the field of every problem.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, create_model

from imageq.api_client.kinds import JOB_KINDS
from imageq.api_client.schemas import JobRecord, WebhookSpec

#: The top-level fields a submit body may have (a tenant comes from the token, never
#: from the body).
SUBMIT_FIELDS = frozenset({"kind", "input", "webhook", "priority", "timeout_s", "metadata"})


def _submit_model(kind: str) -> type[BaseModel]:
    spec = JOB_KINDS[kind]
    # The literal is built at run time, one per kind (a type checker sees Any).
    kind_type: Any = cast(Any, Literal)[kind]
    model: type[BaseModel] = create_model(
        f"Submit{kind.capitalize()}",
        __config__=ConfigDict(extra="forbid"),
        kind=(kind_type, ...),
        input=(spec.input_model, ...),
        webhook=(str | WebhookSpec | None, None),
        priority=(int, Field(default=5, ge=0, le=9)),
        timeout_s=(float | None, Field(default=None, gt=0, le=7 * 24 * 3600)),
        metadata=(dict[str, Any], Field(default_factory=dict)),
    )
    return model


SUBMIT_MODELS = [_submit_model(kind) for kind in JOB_KINDS]


def submit_body_schema() -> dict[str, Any]:
    """The request body's JSON schema: one of the per-kind shapes, by ``kind``."""
    return {
        "oneOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in SUBMIT_MODELS],
        "discriminator": {
            "propertyName": "kind",
            "mapping": {
                kind: f"#/components/schemas/{m.__name__}"
                for kind, m in zip(JOB_KINDS, SUBMIT_MODELS, strict=True)
            },
        },
    }


class JobOut(JobRecord):
    """The job record (docs/design.md §4), as ``Client.get`` returns it."""

    model_config = ConfigDict(extra="allow", title="Job")


class JobPage(BaseModel):
    data: list[JobOut]
    #: Pass as ``cursor`` for the next page; null when there is none.
    next_cursor: str | None


class ErrorDetail(BaseModel):
    code: str = Field(description="a contract error code, e.g. invalid_input, not_found")
    message: str
    field: str | None = Field(default=None, description="the field at fault, when one is")


class ErrorOut(BaseModel):
    error: ErrorDetail


class UploadOut(BaseModel):
    ref: str = Field(description="storage://uploads/...: usable in any image field")
    content_type: str
    bytes: int
    width: int
    height: int


class HealthOut(BaseModel):
    status: Literal["ok"]
    redis: Literal["ok"]
    storage: Literal["ok"]


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error statuses, all in the one format."""
    described = {
        400: "malformed request",
        401: "missing, wrong or revoked token",
        404: "no such job (or another tenant's)",
        409: "idempotency key reused with a different document",
        413: "body over the cap",
        415: "not an image media type",
        422: "invalid input; error.field names it",
        429: "over the tenant's rate or in-flight limit; see Retry-After",
        431: "headers over the cap",
        503: "Redis or storage unavailable; see Retry-After",
        504: "the request ran past its deadline",
    }
    return {s: {"model": ErrorOut, "description": described[s]} for s in statuses}
