"""Uploads: an image put into the deployment's own storage, named by a ``storage://``
reference that any image field of a job accepts (DESIGN §2 "Image references").

The client side writes, the workers read (``imageq.workers.io.images``). Writing needs no
worker code: a local folder is written here, and S3 through boto3, imported only when
an S3 deployment uploads (boto3 is in the ``[server]`` extra, not in the light client).
"""

from __future__ import annotations

import functools
import os
import tempfile
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from imageq.api_client.errors import ImageqError, InvalidInput, TransientError
from imageq.api_client.settings import Settings

#: A reference into the deployment's storage: ``storage://uploads/...``.
STORAGE_SCHEME = "storage://"
#: The only part of the storage a ``storage://`` reference may name.
UPLOAD_PREFIX = "uploads/"

#: The media types an upload may be, by the format its bytes show.
IMAGE_TYPES = {
    "PNG": ("image/png", "png"),
    "JPEG": ("image/jpeg", "jpg"),
    "WEBP": ("image/webp", "webp"),
    "GIF": ("image/gif", "gif"),
    "BMP": ("image/bmp", "bmp"),
}


def sniff_format(data: bytes) -> str | None:
    """The image format the bytes start with (a key of ``IMAGE_TYPES``), or None.

    The bytes decide, not a file name or a Content-Type a client chose.
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    return None


def upload_key(fmt: str, tenant: str | None = None) -> str:
    """A fresh key under ``uploads/`` (a tenant's own folder for gateway uploads).

    Random (122 bits): the reference itself is what grants reading it.
    """
    folder = UPLOAD_PREFIX if tenant is None else f"{UPLOAD_PREFIX}{tenant}/"
    return f"{folder}{uuid.uuid4().hex}.{IMAGE_TYPES[fmt][1]}"


#: Datasets the CLI uploads (``imageq submit finetune DIR``) go under this prefix.
DATASET_PREFIX = UPLOAD_PREFIX + "datasets/"


def dataset_key() -> str:
    """A fresh key for an uploaded dataset archive."""
    return f"{DATASET_PREFIX}{uuid.uuid4().hex}.zip"


def storage_ref(key: str) -> str:
    return STORAGE_SCHEME + key


def ref_key(ref: str) -> str:
    """The storage key a ``storage://`` reference names; only plain keys under uploads/."""
    if not ref.startswith(STORAGE_SCHEME):
        raise InvalidInput(f"not a {STORAGE_SCHEME} reference")
    key = ref[len(STORAGE_SCHEME) :]
    parts = key.split("/")
    if (
        not key.startswith(UPLOAD_PREFIX)
        or "\\" in key
        or "\x00" in key
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise InvalidInput(f"a {STORAGE_SCHEME} reference names a file under {UPLOAD_PREFIX}")
    return key


def put_object(settings: Settings, key: str, data: bytes, content_type: str) -> None:
    """Write ``data`` at ``key`` in the storage ``settings.storage_url`` names."""
    url = settings.storage_url
    if url[:7].lower() == "file://":
        _put_local(local_root(url), key, data)
    elif url[:5].lower() == "s3://":
        bucket, _, prefix = url[5:].partition("/")
        stripped = prefix.strip("/")
        _put_s3(bucket, (stripped + "/" if stripped else "") + key, data, content_type)
    else:
        raise ImageqError(f"IMAGEQ_STORAGE_URL must be file://... or s3://..., not {url!r}")


def get_object(settings: Settings, key: str, max_bytes: int) -> bytes | None:
    """The object at ``key`` in the deployment's storage (at most ``max_bytes``); None
    when it is missing or larger."""
    url = settings.storage_url
    try:
        if url[:7].lower() == "file://":
            data = (local_root(url) / key).read_bytes()
        elif url[:5].lower() == "s3://":
            bucket, _, prefix = url[5:].partition("/")
            stripped = prefix.strip("/")
            full = (stripped + "/" if stripped else "") + key
            body = s3_client().get_object(Bucket=bucket, Key=full)["Body"]
            data = body.read(max_bytes + 1)
        else:
            return None
    except Exception:  # missing, or storage away: the caller tries again later
        return None
    return data if len(data) <= max_bytes else None


def local_root(url: str) -> Path:
    """The folder a ``file://`` storage URL names, absolute: the client and the workers
    (``imageq.workers.io.storage.open_storage``) both read it here, so they name the same
    folder wherever they were started (``file://~/data``: under the home folder)."""
    rest = unquote(url[7:].split("?", 1)[0].split("#", 1)[0])
    if rest.lower().startswith("localhost/"):
        rest = rest[len("localhost") :]
    return Path(rest).expanduser().resolve()


def _put_local(root: Path, key: str, data: bytes) -> None:
    write_atomic(root / key, data)


#: Half-written files start so; listings skip them.
TMP_PREFIX = ".imageq-tmp-"


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that no reader ever sees half of it (temp file, fsync, rename);
    readable by others (0644), since a web server may serve the storage folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@functools.cache
def s3_client() -> Any:
    # One per process: making a boto3 client costs tens of milliseconds. boto3 finds
    # credentials, region and AWS_ENDPOINT_URL itself, as the workers' storage does.
    try:
        import boto3
        from botocore.config import Config
    except ImportError:  # the light client without the [server] extra
        raise ImageqError("uploads to S3 need boto3: pip install 'imageq[server]'") from None
    return boto3.session.Session().client(
        "s3", config=Config(retries={"mode": "standard"}, connect_timeout=10, read_timeout=60)
    )


def _put_s3(bucket: str, key: str, data: bytes, content_type: str) -> None:
    client = s3_client()
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
    except (BotoCoreError, ClientError) as exc:
        # botocore has retried already; the caller may try again later.
        raise TransientError(f"upload to s3://{bucket}/{key}: {exc}") from None
