"""``/v1/uploads`` (an image into the deployment's storage), a job's stored files
(``/v1/jobs/{id}/files/{name}``) and ``/healthz``.

An upload is checked here as far as its header: one of the allowed formats, within
the byte cap (413 over it) and the pixel cap (decompression bombs never reach a
worker). Workers decode it fully, with the same caps, when a job names it.
"""

from __future__ import annotations

import re
from io import BytesIO
from typing import Any

from fastapi import APIRouter, Request
from PIL import Image, UnidentifiedImageError
from redis.exceptions import RedisError
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse, Response

from imageq.api_client.errors import ImageqError, InvalidInput
from imageq.api_client.uploads import IMAGE_TYPES
from imageq.gateway.errors import (
    JobNotFound,
    PayloadTooLarge,
    RateLimited,
    Unavailable,
    UnsupportedMediaType,
    retry_after,
)
from imageq.gateway.jobs import SECURED, authenticate, gateway
from imageq.gateway.models import HealthOut, UploadOut, errors
from imageq.gateway.state import Gateway
from imageq.workers.io.images import FORMATS
from imageq.workers.io.storage import ObjectNotFound

router = APIRouter()

_MEDIA = sorted({media for media, _ in IMAGE_TYPES.values()})
_UPLOAD_DOC = {
    **SECURED,
    "requestBody": {
        "required": True,
        "content": {
            **{m: {"schema": {"type": "string", "format": "binary"}} for m in _MEDIA},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    },
}


def probe(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height) from the image's header, within the pixel cap."""
    try:
        with Image.open(BytesIO(data), formats=list(FORMATS)) as image:
            fmt, (width, height) = str(image.format), image.size
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise InvalidInput("file: not a JPEG, PNG, WebP, GIF or BMP image") from None
    except Exception as exc:  # PIL raises many types on a damaged header
        raise InvalidInput(
            f"file: could not read the image header ({type(exc).__name__})"
        ) from None
    if width <= 0 or height <= 0 or width * height > max_pixels:
        raise InvalidInput(
            f"file: image is {width}x{height} = {width * height} pixels, over the limit "
            f"of {max_pixels}"
        )
    return fmt, width, height


def upload_sync(gw: Gateway, tenant: str, data: bytes, media: str) -> dict[str, Any]:
    wait = gw.limits.take(tenant, "uploads")
    if wait:
        raise RateLimited(
            f"over this tenant's upload rate; retry in {wait:.2f} s", retry_after(wait)
        )
    fmt, width, height = probe(data, gw.settings.max_image_pixels)
    ref = gw.client.upload(data, media, tenant=tenant)
    return {
        "ref": ref,
        "content_type": IMAGE_TYPES[fmt][0],
        "bytes": len(data),
        "width": width,
        "height": height,
    }


@router.post(
    "/v1/uploads",
    tags=["uploads"],
    status_code=201,
    response_model=UploadOut,
    responses=errors(400, 401, 413, 415, 422, 429, 431, 503, 504),
    openapi_extra=_UPLOAD_DOC,
    summary="Upload an image; use its ref in a job's input",
)
async def upload(request: Request) -> Response:
    tenant = await authenticate(request)
    gw = gateway(request)
    cap = gw.settings.max_image_bytes
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=8, max_part_size=cap)
        try:
            part = form.get("file")
            if not isinstance(part, UploadFile):
                raise InvalidInput("file: a multipart part named 'file' is required")
            data = await part.read(cap + 1)
            media = (part.content_type or "").split(";")[0].strip().lower()
        finally:
            await form.close()
    elif media.startswith("image/"):
        data = await request.body()
    else:
        raise UnsupportedMediaType(
            f"Content-Type: send the image as image/... or multipart/form-data, not {media!r}"
        )
    if len(data) > cap:
        raise PayloadTooLarge(f"file: larger than the limit of {cap} bytes")
    if not media.startswith("image/"):
        raise UnsupportedMediaType(f"file: {media!r} is not an image media type")
    info = await gw.run_io(upload_sync, gw, tenant.name, data, media)
    return JSONResponse(info, status_code=201)


# What a job writes under jobs/{id}/: image-0.png, result.json, overlays. One plain name,
# never a path.
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,100}\.(png|jpg|webp|json)$")
_FILE_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "webp": "image/webp",
    "json": "application/json",
}
# A 2048x2048 PNG of noise is about 12 MB: far under this, which only bounds a read.
_MAX_FILE_BYTES = 64 * 1024 * 1024


@router.get(
    "/v1/jobs/{job_id}/files/{name}",
    tags=["jobs"],
    name="job_file",
    response_class=Response,
    responses={
        200: {"description": "the file", "content": {m: {} for m in _FILE_TYPES.values()}},
        **errors(401, 404, 431, 503, 504),
    },
    summary="One of the tenant's job's stored files (image-0.png, result.json)",
    openapi_extra=SECURED,
)
async def job_file(request: Request, job_id: str, name: str) -> Response:
    """For local storage, where there are no presigned URLs (the images API's ``url``)."""
    tenant = await authenticate(request)
    gw = gateway(request)
    await gw.owned(tenant.name, job_id)
    match = _FILE_NAME.match(name)
    if match is None:
        raise JobNotFound(f"name: job {job_id!r} has no file {name!r}")
    try:
        data = await gw.run_io(gw.storage().get, f"jobs/{job_id}/{name}", _MAX_FILE_BYTES)
    except ObjectNotFound:
        raise JobNotFound(f"name: job {job_id!r} has no file {name!r}") from None
    return Response(data, media_type=_FILE_TYPES[match.group(1)])


@router.get(
    "/healthz",
    tags=["operations"],
    response_model=HealthOut,
    responses=errors(503),
    summary="Redis and storage reachable",
)
async def healthz(request: Request) -> Response:
    gw = gateway(request)
    try:
        await gw.aredis.ping()
    except (RedisError, OSError) as exc:
        raise Unavailable(f"redis: unreachable ({type(exc).__name__})") from None
    try:
        # A key that need not exist: a clean "no" proves storage answers.
        await gw.run_io(gw.storage().exists, "uploads/.healthz")
    except (ImageqError, OSError) as exc:
        raise Unavailable(f"storage: unreachable ({type(exc).__name__})") from None
    return JSONResponse({"status": "ok", "redis": "ok", "storage": "ok"})
