"""The public contract: job documents, inputs of every kind, job records (DESIGN §2-§4).

Producers validate here before enqueueing and workers validate again on receipt,
because a raw Celery message may carry anything.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from api_client.errors import InvalidInput

KINDS = ("caption", "match", "generate", "inpaint", "style", "finetune")
Kind = Literal["caption", "match", "generate", "inpaint", "style", "finetune"]
STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
FINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
EVENTS = ("job.started", "job.progress", "job.succeeded", "job.failed", "job.canceled")
IMAGE_SCHEMES = ("s3://", "https://", "http://", "data:image/", "file://")
SCHEDULERS = ("ddim", "euler", "euler_ancestral", "dpmpp_2m", "pndm", "default")
# The display names (AUTOMATIC1111's, diffusers') are accepted too, in any case.
SCHEDULER_ALIASES = {
    "euler a": "euler_ancestral",
    "euler_a": "euler_ancestral",
    "dpm-solver++": "dpmpp_2m",
    "dpm++ 2m": "dpmpp_2m",
    "plms": "pndm",
}
IDEMPOTENCY_NAMESPACE = uuid.UUID("6f1f5bd2-4b8e-4d64-8f0f-2a3c86d5a4e1")


def _check_image_ref(value: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("an image reference must be a non-empty string")
    if not value.startswith(IMAGE_SCHEMES):
        raise ValueError(
            "unsupported image reference: use s3://, https://, http://, data:image/... "
            "or file:// (where the deployment allows local files)"
        )
    if len(value) > 4096 and not value.startswith("data:"):
        raise ValueError("image URL longer than 4096 characters")
    return value


ImageRef = Annotated[str, Field(min_length=1), AfterValidator(_check_image_ref)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class AdapterRef(_Strict):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    scale: float = Field(default=1.0, ge=-2.0, le=4.0)


class GenerationOptions(_Strict):
    max_new_tokens: int = Field(default=30, ge=1, le=256)
    min_new_tokens: int = Field(default=0, ge=0, le=256)
    num_beams: int = Field(default=1, ge=1, le=10)
    do_sample: bool = False
    top_k: int = Field(default=50, ge=0, le=1000)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    temperature: float = Field(default=1.0, gt=0.0, le=10.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    num_return_sequences: int = Field(default=1, ge=1, le=10)

    @model_validator(mode="after")
    def _consistent(self) -> GenerationOptions:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens must not exceed max_new_tokens")
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise ValueError(
                "num_return_sequences must not exceed num_beams unless do_sample is true"
            )
        return self


class _ImagesInput(_Strict):
    """Accepts ``image`` as shorthand for a one-element ``images`` list."""

    images: list[ImageRef] = Field(min_length=1, max_length=512)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and "image" in data:
            if "images" in data:
                raise ValueError("give either image or images, not both")
            data = dict(data)
            data["images"] = [data.pop("image")]
        return data


class CaptionInput(_ImagesInput):
    prompt: str | None = Field(default=None, max_length=512)
    generation: GenerationOptions = Field(default_factory=GenerationOptions)
    attention: bool = False
    adapter: str | None = Field(default=None, min_length=1, max_length=128)


class MatchInput(_ImagesInput):
    texts: list[Annotated[str, Field(min_length=1, max_length=2000)]] = Field(
        min_length=1, max_length=64
    )

    @field_validator("texts")
    @classmethod
    def _non_blank(cls, value: list[str]) -> list[str]:
        for i, text in enumerate(value):
            if not text.strip():
                raise ValueError(f"texts[{i}] is blank")
        return value


class _DiffusionCommon(_Strict):
    prompt: str = Field(default="", max_length=2000)
    negative_prompt: str = Field(default="", max_length=2000)
    steps: int = Field(default=25, ge=1, le=150)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=30.0)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    num_images: int = Field(default=1, ge=1, le=8)
    scheduler: Literal["ddim", "euler", "euler_ancestral", "dpmpp_2m", "pndm", "default"] = (
        "default"
    )
    adapters: list[AdapterRef] = Field(default_factory=list, max_length=8)

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            name = value.strip().lower()
            return SCHEDULER_ALIASES.get(name, name)
        return value


class GenerateInput(_DiffusionCommon):
    prompt: str = Field(min_length=1, max_length=2000)
    width: int = Field(default=512, ge=64, le=2048)
    height: int = Field(default=512, ge=64, le=2048)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError("must be a multiple of 8")
        return value


class InpaintInput(_DiffusionCommon):
    image: ImageRef
    mask: ImageRef
    prompt: str = Field(min_length=1, max_length=2000)
    strength: float = Field(default=1.0, gt=0.0, le=1.0)


class StyleInput(_DiffusionCommon):
    image: ImageRef
    style_image: ImageRef | None = None
    style_prompt: str | None = Field(default=None, min_length=1, max_length=2000)
    style_scale: float = Field(default=0.6, ge=0.0, le=2.0)
    strength: float = Field(default=0.6, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _some_style(self) -> StyleInput:
        if not (self.style_image or self.style_prompt or self.adapters):
            raise ValueError("give at least one of style_image, style_prompt or adapters")
        return self


class FinetuneInput(_Strict):
    target: Literal["diffusion", "caption"]
    dataset: str = Field(min_length=1, max_length=4096)
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    rank: int = Field(default=8, ge=1, le=256)
    alpha: float = Field(default=8.0, gt=0.0, le=1024.0)
    learning_rate: float = Field(default=1e-4, gt=0.0, le=1.0)
    max_steps: int = Field(default=500, ge=1, le=1_000_000)
    batch_size: int = Field(default=1, ge=1, le=256)
    resolution: int = Field(default=512, ge=64, le=2048)
    checkpoint_every: int = Field(default=100, ge=1, le=1_000_000)
    auto_caption: bool = False
    overwrite: bool = False
    seed: int = Field(default=0, ge=0, le=2**32 - 1)

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError("must be a multiple of 8")
        return value


INPUT_MODELS: dict[str, type[_Strict]] = {
    "caption": CaptionInput,
    "match": MatchInput,
    "generate": GenerateInput,
    "inpaint": InpaintInput,
    "style": StyleInput,
    "finetune": FinetuneInput,
}


EventType = Literal["job.started", "job.progress", "job.succeeded", "job.failed", "job.canceled"]


def _final_events() -> list[EventType]:
    return ["job.succeeded", "job.failed", "job.canceled"]


class WebhookSpec(_Strict):
    url: str = Field(min_length=1, max_length=2048)
    events: list[EventType] = Field(default_factory=_final_events)

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("webhook url must be http:// or https://")
        return value


class JobDocument(_Strict):
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")
    kind: Kind
    input: dict[str, Any]
    webhook: WebhookSpec | None = None
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=256)
    priority: int = Field(default=5, ge=0, le=9)
    timeout_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def _small(cls, value: dict[str, Any]) -> dict[str, Any]:
        import json

        if len(json.dumps(value, default=str)) > 4096:
            raise ValueError("metadata must serialise to at most 4096 bytes")
        return value

    def parsed_input(self) -> Any:
        """The input as its kind's model (raises ``InvalidInput`` naming the field)."""
        return parse_input(self.kind, self.input)


class ErrorRecord(BaseModel):
    code: str
    message: str


class JobRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    kind: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
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

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES


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


def parse_input(kind: str, data: Any) -> Any:
    model = INPUT_MODELS.get(kind)
    if model is None:
        raise InvalidInput(f"kind: unknown job kind {kind!r}; expected one of {', '.join(KINDS)}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(describe_validation_error(exc, "input")) from None


def parse_job(data: Any) -> JobDocument:
    """Validate a whole job document, its input included."""
    if not isinstance(data, dict):
        raise InvalidInput(f"document: a job must be a JSON object, not {type(data).__name__}")
    problems = []
    doc = None
    try:
        doc = JobDocument.model_validate(data)
    except ValidationError as exc:
        problems.append(describe_validation_error(exc))
    # Report the input's problems too, so one answer names every field to fix.
    kind, inp = data.get("kind"), data.get("input")
    if kind in INPUT_MODELS and isinstance(inp, dict):
        try:
            parse_input(kind, inp)
        except InvalidInput as exc:
            problems.append(exc.message)
    if problems or doc is None:
        raise InvalidInput("; ".join(problems))
    return doc


def job_id_for(idempotency_key: str | None) -> str:
    """Ids derive from the idempotency key, so two submits of one key share one id."""
    if idempotency_key:
        return str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, idempotency_key))
    return str(uuid.uuid4())
