"""The public contract's documents: the job document, webhooks spec, the job record
(DESIGN §3-§4). The inputs of each kind are in ``inputs.py``, the kinds in ``kinds.py``.

Producers validate here before enqueueing and workers validate again on receipt,
because a raw Celery message may carry anything.
"""

from __future__ import annotations

import json
from contextlib import suppress
from enum import StrEnum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from imageq.api_client.errors import InvalidInput
from imageq.api_client.inputs import JobInput, Strict
from imageq.api_client.kinds import JOB_KINDS, KINDS

# A gateway tenant's name: short, and safe inside Redis keys and storage paths.
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
EVENTS = (
    "job.started",
    "job.progress",
    "job.preview",
    "job.succeeded",
    "job.failed",
    "job.canceled",
)


class JobStatus(StrEnum):
    """A job's state; members are strings, so records stay plain JSON."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


STATUSES = tuple(JobStatus)
FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})


EventType = Literal[
    "job.started", "job.progress", "job.preview", "job.succeeded", "job.failed", "job.canceled"
]


def _final_events() -> list[EventType]:
    return ["job.succeeded", "job.failed", "job.canceled"]


class WebhookSpec(Strict):
    url: str = Field(min_length=1, max_length=2048)
    events: list[EventType] = Field(default_factory=_final_events)

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("webhook url must be http:// or https://")
        return value


class JobDocument(Strict):
    """A job as enqueued; ``input`` is the kind's own model, validated once, here."""

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")
    kind: str
    # Serialised as the kind's own model (its fields), not as the empty base class.
    input: SerializeAsAny[JobInput]
    webhook: WebhookSpec | None = None
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=256)
    priority: int = Field(default=5, ge=0, le=9)
    timeout_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    metadata: dict[str, Any] = Field(default_factory=dict)
    # Who submitted it through the HTTP gateway; a tenant sees only its own jobs.
    tenant: str | None = Field(default=None, pattern=TENANT_PATTERN)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        if value not in JOB_KINDS:
            raise ValueError(f"unknown job kind {value!r}; expected one of {', '.join(KINDS)}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _typed_input(cls, data: Any) -> Any:
        # The kind picks the input's model (a union discriminated by the document's kind);
        # an input that does not fit is reported by parse_job, naming the field.
        if isinstance(data, dict) and data.get("kind") in JOB_KINDS:
            inp = data.get("input")
            if isinstance(inp, dict):
                model = JOB_KINDS[data["kind"]].input_model
                # Left as a dict when it does not fit: ``_input_object`` refuses it.
                with suppress(ValidationError):
                    data = {**data, "input": model.model_validate(inp)}
        return data

    @field_validator("input", mode="before")
    @classmethod
    def _input_object(cls, value: Any) -> Any:
        if not isinstance(value, JobInput):
            raise ValueError("input must be a JSON object with the fields of the job's kind")
        return value

    @field_validator("metadata")
    @classmethod
    def _small(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value, default=str)) > 4096:
            raise ValueError("metadata must serialise to at most 4096 bytes")
        return value

    def wire(self) -> dict[str, Any]:
        """The document as it travels and is stored (JSON, no nulls)."""
        return self.model_dump(mode="json", exclude_none=True)


class ErrorRecord(BaseModel):
    code: str
    message: str


class JobRecord(BaseModel):
    """The job record (DESIGN §4): one type for the client, the workers and webhooks."""

    model_config = ConfigDict(extra="allow")

    id: str
    kind: str
    status: JobStatus
    progress: dict[str, Any] | None = None
    output: dict[str, Any] | None = None
    error: ErrorRecord | None = None
    attempt: int = 0
    worker: str | None = None
    model: str | None = None
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    result_uri: str | None = None
    result_url: str | None = None
    #: While queued, when read through ``get``: messages that will be taken before it.
    queue_position: int | None = None
    #: The gateway tenant that submitted the job (None: submitted without the gateway).
    tenant: str | None = None

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    def to_json(self) -> dict[str, Any]:
        """The record as JSON (what Redis, result.json and webhooks carry)."""
        data = self.model_dump(mode="json")
        # Only S3 deployments have a result_url, only a read of a queued job a
        # position and only a gateway job a tenant: other records stay as they were.
        for optional in ("result_url", "queue_position", "tenant"):
            if data.get(optional) is None:
                data.pop(optional, None)
        return data


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the field as a path (``input.images[0]``)."""
    parts = []
    for err in exc.errors():
        path = prefix
        for loc in err.get("loc", ()):
            if isinstance(loc, int):
                path += f"[{loc}]"
            else:
                path += ("." if path else "") + str(loc)
        message = str(err.get("msg", "invalid"))
        parts.append(f"{path or 'document'}: {message}")
    return "; ".join(parts)


def parse_input(kind: str, data: Any) -> JobInput:
    """Validate one kind's input (raises ``InvalidInput`` naming the field)."""
    spec = JOB_KINDS.get(kind)
    if spec is None:
        raise InvalidInput(f"kind: unknown job kind {kind!r}; expected one of {', '.join(KINDS)}")
    try:
        return spec.input_model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(describe_validation_error(exc, "input")) from None


def parse_job(data: Any) -> JobDocument:
    """Validate a whole job document, its input included; every problem is named."""
    if not isinstance(data, dict):
        raise InvalidInput(f"document: a job must be a JSON object, not {type(data).__name__}")
    problems = []
    candidate = dict(data)
    kind, inp = data.get("kind"), data.get("input")
    if isinstance(inp, dict) and kind in JOB_KINDS:
        try:
            candidate["input"] = parse_input(kind, inp)
        except InvalidInput as exc:
            problems.append(exc.message)
    if problems or (isinstance(inp, dict) and kind not in JOB_KINDS):
        # The input is reported already (or its kind is unknown): check the rest of the
        # document around a stand-in, so one answer names every field to fix, once.
        candidate["input"] = JobInput()
    try:
        doc = JobDocument.model_validate(candidate)
    except ValidationError as exc:
        problems.insert(0, describe_validation_error(exc))
        raise InvalidInput("; ".join(problems)) from None
    if problems:
        raise InvalidInput("; ".join(problems))
    return doc
