"""OpenAI-compatible ``/v1/images/*`` and ``/v1/models``: the official ``openai`` client,
pointed at the gateway by ``base_url``, generates and edits images on imageq.

Each call is one imageq job (``generate``, ``inpaint`` or ``style``) submitted as a
native submit is (same token, tenant, limits, reference checks and usage), then waited
for, as the client expects a synchronous answer. Errors on these routes take OpenAI's
shape (``errors.error_response`` picks it by path); everywhere else imageq's own.
Streaming (``stream: true``) is refused: there are no partial images to send yet.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse, Response

from imageq.api_client.errors import InvalidInput
from imageq.api_client.schemas import JobRecord, JobStatus
from imageq.api_client.uploads import IMAGE_TYPES, sniff_format
from imageq.gateway.errors import (
    GatewayTimeout,
    Malformed,
    PayloadTooLarge,
    UnsupportedMediaType,
    error_response,
)
from imageq.gateway.files import probe, upload_sync
from imageq.gateway.jobs import SECURED, authenticate, gateway, submit_sync
from imageq.gateway.openai_compat import (
    ResponseFormat,
    diffusion_fields,
    mask_from_alpha,
    parse_size,
    response_format,
)
from imageq.gateway.state import Gateway
from imageq.gateway.stream import wait_final
from imageq.gateway.tokens import Tenant

router = APIRouter(prefix="/v1", tags=["openai"])


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorOut(BaseModel):
    error: OpenAIError


class ImageOut(BaseModel):
    b64_json: str | None = None
    url: str | None = None


class ImagesOut(BaseModel):
    created: int
    data: list[ImageOut]


class ModelOut(BaseModel):
    id: str
    object: str
    created: int
    owned_by: str


class ModelsOut(BaseModel):
    object: str
    data: list[ModelOut]


_DIFFUSION_PROPERTIES: dict[str, Any] = {
    "prompt": {"type": "string"},
    "n": {"type": "integer", "minimum": 1, "maximum": 8},
    "size": {"type": "string", "description": "WIDTHxHEIGHT (multiples of 8) or auto"},
    "response_format": {"type": "string", "enum": ["b64_json", "url"]},
    "quality": {"type": "string", "enum": ["low", "medium", "standard", "auto", "high", "hd"]},
    "model": {"type": "string", "description": "an alias from GET /v1/models"},
    "user": {"type": "string"},
    "negative_prompt": {"type": "string"},
    "seed": {"type": "integer"},
    "steps": {"type": "integer"},
    "guidance_scale": {"type": "number"},
    "scheduler": {"type": "string"},
    "adapter": {"type": "string"},
}
_FILE = {"type": "string", "format": "binary"}


def _body(media: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "required": required}
    return {
        **SECURED,
        "requestBody": {"required": True, "content": {media: {"schema": schema}}},
    }


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these statuses, in OpenAI's error shape."""
    described = {
        400: "invalid request (the native API's 422 too), or the job failed on its input",
        401: "missing, wrong or revoked token",
        413: "body over the cap",
        415: "wrong Content-Type",
        429: "over the tenant's rate or in-flight limit; see Retry-After",
        431: "headers over the cap",
        500: "the job failed in the model (error.code says how)",
        503: "Redis or storage unavailable; see Retry-After",
        504: "the job did not finish in IMAGEQ_GATEWAY_OPENAI_WAIT_S; the message names its id",
    }
    return {s: {"model": OpenAIErrorOut, "description": described[s]} for s in statuses}


#: Job errors that are the request's fault: OpenAI's 400. Any other is a 500.
_CLIENT_FAULTS = frozenset({"invalid_input", "input_fetch_failed", "forbidden_url"})
# The client retries 5xx (and 408/409) on its own; a retry would submit a second job.
_NO_RETRY = {"x-should-retry": "false"}

_GENERATION_FIELDS = frozenset(
    {
        "prompt", "n", "size", "response_format", "quality", "user", "model", "style",
        "negative_prompt", "seed", "steps", "guidance_scale", "scheduler", "adapter",
        "stream", "partial_images", "background", "moderation", "output_format",
        "output_compression",
    }
)  # fmt: skip


def _refuse_stream(params: dict[str, Any]) -> None:
    if params.get("stream") in (True, "true", "True"):
        raise InvalidInput("stream: streaming partial images is not supported yet")


async def _run(
    request: Request, tenant: Tenant, kind: str, inp: dict[str, Any], params: dict[str, Any]
) -> Response:
    """Submit the job as the tenant, wait for it and answer OpenAI's way."""
    gw = gateway(request)
    fmt = response_format(params.get("response_format"))
    body: dict[str, Any] = {"kind": kind, "input": inp}
    if isinstance(params.get("user"), str):
        body["metadata"] = {"openai_user": params["user"][:256]}
    record, _ = await gw.run(submit_sync, gw, tenant.name, body, None)
    wait_s = gw.settings.gateway_openai_wait_s
    record = await wait_final(gw.hub, gw.channel(record.id), gw.read, record, wait_s)
    path = request.url.path
    if not record.is_final:
        raise GatewayTimeout(
            f"job {record.id} did not finish within {wait_s:g} s; it goes on: "
            f"GET /v1/jobs/{record.id}",
            _NO_RETRY,
        )
    if record.status != JobStatus.SUCCEEDED:
        code = record.error.code if record.error is not None else "canceled"
        message = record.error.message if record.error is not None else "canceled"
        status = 400 if code in _CLIENT_FAULTS else 500
        return error_response(
            status, code, f"job {record.id} {record.status}: {message}", None, _NO_RETRY, path
        )
    data = [await _image(request, gw, record, entry, fmt) for entry in _images(record)]
    return JSONResponse({"created": _unix(record.created_at), "data": data})


def _unix(stamp: str) -> int:
    """OpenAI's ``created`` (Unix seconds) from the record's ISO 8601 time."""
    try:
        return int(datetime.fromisoformat(stamp).timestamp())
    except ValueError:
        return int(time.time())


def _images(record: JobRecord) -> list[dict[str, Any]]:
    images = (record.output or {}).get("images", [])
    return [entry for entry in images if isinstance(entry, dict)]


async def _image(
    request: Request, gw: Gateway, record: JobRecord, entry: dict[str, Any], fmt: ResponseFormat
) -> dict[str, Any]:
    name = str(entry.get("uri", "")).rsplit("/", 1)[-1]
    key = f"jobs/{record.id}/{name}"
    storage = gw.storage()
    if fmt is ResponseFormat.B64_JSON:
        png = await gw.run_io(storage.get, key)
        return {"b64_json": base64.b64encode(png).decode("ascii")}
    # S3: presigned; local storage: the gateway serves the tenant its own job's files.
    url = await gw.run_io(storage.public_url, key)
    if url is None:
        url = str(request.url_for("job_file", job_id=record.id, name=name))
    return {"url": url}


def _models(request: Request) -> dict[str, str | None]:
    # Parsed once by create_app: a bad IMAGEQ_GATEWAY_OPENAI_MODELS stops the start.
    models: dict[str, str | None] = request.app.state.openai_models
    return models


# -- generations -----------------------------------------------------------------------


@router.post(
    "/images/generations",
    response_model=ImagesOut,
    responses=errors(400, 401, 413, 415, 429, 431, 500, 503, 504),
    summary="OpenAI-compatible: generate images (a generate job, waited for)",
    openapi_extra=_body("application/json", _DIFFUSION_PROPERTIES, ["prompt"]),
)
async def generations(request: Request) -> Response:
    tenant = await authenticate(request)
    params = await _json_params(request)
    _refuse_stream(params)
    gw = gateway(request)
    inp: dict[str, Any] = {"prompt": params.get("prompt")}
    size = parse_size(params.get("size"), gw.settings.max_output_pixels)
    if size is not None:
        inp["width"], inp["height"] = size
    inp.update(diffusion_fields(params, _models(request)))
    return await _run(request, tenant, "generate", inp, params)


async def _json_params(request: Request) -> dict[str, Any]:
    media = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if media.lower() != "application/json":
        raise UnsupportedMediaType(f"Content-Type: send application/json, not {media!r}")
    try:
        params = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Malformed("body: not valid JSON") from None
    if not isinstance(params, dict):
        raise InvalidInput("body: a JSON object is required")
    unknown = sorted(set(params) - _GENERATION_FIELDS)
    if unknown:
        raise InvalidInput(f"{unknown[0]}: unknown parameter")
    return params


# -- edits and variations (multipart) --------------------------------------------------


async def _form(request: Request) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The text fields and the files (``image`` or ``image[]``, ``mask``) of a form."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "multipart/form-data":
        raise UnsupportedMediaType(f"Content-Type: send multipart/form-data, not {media!r}")
    cap = gateway(request).settings.max_image_bytes
    form = await request.form(max_files=2, max_fields=32, max_part_size=cap)
    params: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read(cap + 1)
                if len(data) > cap:
                    raise PayloadTooLarge(f"{name}: larger than the limit of {cap} bytes")
                files.setdefault(name.removesuffix("[]"), data)
            else:
                params.setdefault(name, value)
    finally:
        await form.close()
    if "image" not in files:
        raise InvalidInput("image: an image file is required")
    return params, files


async def _upload(gw: Gateway, tenant: str, name: str, data: bytes) -> str:
    """The tenant's upload (as ``POST /v1/uploads`` stores it): its storage:// ref."""
    fmt = sniff_format(data)
    if fmt is None:
        raise InvalidInput(f"{name}: not a JPEG, PNG, WebP, GIF or BMP image")
    info = await gw.run_io(upload_sync, gw, tenant, data, IMAGE_TYPES[fmt][0])
    return str(info["ref"])


def _check_edit_size(params: dict[str, Any], image: bytes, gw: Gateway) -> None:
    # inpaint and style keep the input image's size; a different size is refused rather
    # than silently ignored.
    size = parse_size(params.get("size"), gw.settings.max_output_pixels)
    if size is None:
        return
    _, width, height = probe(image, gw.settings.max_image_pixels)
    if size != (width, height):
        raise InvalidInput(
            f"size: edits keep the image's size ({width}x{height}); send that, auto or none"
        )


@router.post(
    "/images/edits",
    response_model=ImagesOut,
    responses=errors(400, 401, 413, 415, 429, 431, 500, 503, 504),
    summary="OpenAI-compatible: with a mask, inpaint (transparent = repaint); else style",
    openapi_extra=_body(
        "multipart/form-data",
        {**_DIFFUSION_PROPERTIES, "image": _FILE, "mask": _FILE},
        ["image", "prompt"],
    ),
)
async def edits(request: Request) -> Response:
    tenant = await authenticate(request)
    gw = gateway(request)
    params, files = await _form(request)
    _refuse_stream(params)
    prompt = params.get("prompt")
    if not prompt:
        raise InvalidInput("prompt: required")
    _check_edit_size(params, files["image"], gw)
    fields = diffusion_fields(params, _models(request))
    if "mask" in files:
        probe(files["mask"], gw.settings.max_image_pixels)  # the pixel cap before decoding
        mask = mask_from_alpha(files["mask"])
        inp = {
            "image": await _upload(gw, tenant.name, "image", files["image"]),
            "mask": await _upload(gw, tenant.name, "mask", mask),
            "prompt": prompt,
            # OpenAI's edits change the masked area only.
            "keep_unmasked": True,
            **fields,
        }
        return await _run(request, tenant, "inpaint", inp, params)
    inp = {
        "image": await _upload(gw, tenant.name, "image", files["image"]),
        "style_prompt": prompt,
        **fields,
    }
    return await _run(request, tenant, "style", inp, params)


@router.post(
    "/images/variations",
    response_model=ImagesOut,
    responses=errors(400, 401, 413, 415, 429, 431, 500, 503, 504),
    summary="OpenAI-compatible: variations of an image (style towards itself)",
    openapi_extra=_body(
        "multipart/form-data",
        {k: v for k, v in _DIFFUSION_PROPERTIES.items() if k != "prompt"} | {"image": _FILE},
        ["image"],
    ),
)
async def variations(request: Request) -> Response:
    tenant = await authenticate(request)
    gw = gateway(request)
    params, files = await _form(request)
    _check_edit_size(params, files["image"], gw)
    ref = await _upload(gw, tenant.name, "image", files["image"])
    # No prompt: the image is its own style reference (IP-Adapter), so a worker without
    # IP-Adapter fails the job as invalid_input (400), saying so.
    inp = {"image": ref, "style_image": ref, **diffusion_fields(params, _models(request))}
    return await _run(request, tenant, "style", inp, params)


@router.get(
    "/models",
    response_model=ModelsOut,
    responses=errors(401, 431),
    summary="OpenAI-compatible: the model aliases (IMAGEQ_GATEWAY_OPENAI_MODELS)",
    openapi_extra=SECURED,
)
async def models(request: Request) -> Response:
    await authenticate(request)
    data = [
        {"id": alias, "object": "model", "created": 0, "owned_by": "imageq"}
        for alias in _models(request)
    ]
    return JSONResponse({"object": "list", "data": data})
