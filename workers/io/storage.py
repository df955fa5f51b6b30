"""Object storage for outputs, result copies and adapters (DESIGN §4 storage layout).

Keys are relative, slash-separated paths such as ``jobs/{id}/result.json`` or
``adapters/{name}/adapter.safetensors``. ``open_storage`` picks the backend from
``IMAGEQ_STORAGE_URL``: a local folder (``file://~/imageq-data``) or S3 (``s3://bucket/prefix``).
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar
from urllib.parse import unquote

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from imageq.api_client.errors import (
    ForbiddenUrl,
    InputFetchFailed,
    InternalError,
    InvalidInput,
    TransientError,
)
from imageq.api_client.object_urls import MAX_PRESIGN_TTL_S
from imageq.api_client.settings import Settings
from imageq.api_client.uploads import TMP_PREFIX, local_root, write_atomic
from imageq.workers.io.s3_put import LightPut

T = TypeVar("T")

_THROTTLING_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
    }
)
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_CHUNK_BYTES = 1024 * 1024


class ObjectNotFound(InputFetchFailed):
    """The key (or s3:// object) does not exist."""


class StorageError(InternalError):
    """Storage refused a request in a way another try will not fix (permissions, no bucket)."""


class Storage(Protocol):
    def uri(self, key: str) -> str: ...

    def put(self, key: str, data: bytes, content_type: str) -> str: ...

    def get(self, key: str, max_bytes: int | None = None) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> builtins.list[str]: ...

    def delete(self, key: str) -> None: ...

    def public_url(self, key: str) -> str | None: ...

    def read_uri(self, uri: str, max_bytes: int | None = None) -> bytes: ...


class TooLarge(InvalidInput):
    """Input over a byte cap (an image, an object, an archive)."""


def too_big(what: str, limit: int) -> TooLarge:
    """The error for input over a byte cap of ``limit`` bytes."""
    return TooLarge(f"{what} is larger than the limit of {limit} bytes")


def read_capped(stream: IO[bytes], max_bytes: int | None, what: str) -> bytes:
    """All of ``stream``, read in chunks and stopped one chunk past ``max_bytes``.

    Whatever a header declared: the bytes are counted as they arrive, so an object over
    the cap never sits whole in memory (``InvalidInput``).
    """
    if max_bytes is None:
        return stream.read()
    body = bytearray()
    while chunk := stream.read(min(_CHUNK_BYTES, max_bytes + 1 - len(body))):
        body += chunk
        if len(body) > max_bytes:
            raise too_big(what, max_bytes)
    return bytes(body)


def check_key(key: str) -> str:
    """``key`` if it is a plain relative path that cannot leave the storage root."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise InvalidInput(f"invalid storage key {key!r}")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidInput(f"invalid storage key {key!r}: empty, '.' or '..' segment")
    return key


def _check_prefix(prefix: str) -> str:
    if prefix:
        check_key(prefix.rstrip("/") or "/")
    return prefix


def file_uri_path(uri: str) -> Path:
    """The path of a ``file://`` URI.

    ``file:///abs`` and ``file://localhost/abs`` are absolute; ``file://./data`` is
    relative to the working directory (never a storage root: see ``open_storage``).
    """
    if uri[:7].lower() != "file://":
        raise InvalidInput(f"not a file:// URI: {uri[:40]!r}")
    rest = unquote(uri[7:].split("?", 1)[0].split("#", 1)[0])
    if rest.lower().startswith("localhost/"):
        rest = rest[len("localhost") :]
    if not rest:
        raise InvalidInput(f"file URI {uri!r} names no path")
    return Path(rest)


def _split_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    if uri[:5].lower() != "s3://" or not bucket or not key:
        raise InvalidInput(f"malformed S3 URI {uri!r}: expected s3://bucket/key")
    return bucket, key


class LocalStorage:
    """A folder on a local or shared disk; writes are atomic (temp file, fsync, rename)."""

    def __init__(self, root: Path, settings: Settings | None = None) -> None:
        # Resolved once, so a later chdir does not move the storage.
        self.root = Path(root).resolve()
        self._settings = settings if settings is not None else Settings()
        self._s3: _S3Client | None = None

    def _path(self, key: str) -> Path:
        path = self.root / check_key(key)
        # A symlink inside the root must not lead out of it.
        if not path.resolve().is_relative_to(self.root):
            raise InvalidInput(f"storage key {key!r} leads outside the storage root")
        return path

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def put(self, key: str, data: bytes, content_type: str) -> str:
        path = self._path(key)
        write_atomic(path, data)
        _fsync_dir(path.parent)
        return path.as_uri()  # what uri(key) says, without resolving the path again

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        path = self._path(key)
        try:
            with path.open("rb") as handle:
                return read_capped(handle, max_bytes, "the object")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            # The root stays out: messages reach the job's submitter.
            raise ObjectNotFound(f"no object {key!r} in storage") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> builtins.list[str]:
        _check_prefix(prefix)
        directory = prefix.rpartition("/")[0]
        base = self.root / directory if directory else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(TMP_PREFIX):
                    continue
                key = (Path(dirpath) / name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def public_url(self, key: str) -> str | None:
        return None

    def read_uri(self, uri: str, max_bytes: int | None = None) -> bytes:
        scheme = uri.partition(":")[0].lower()
        if scheme == "file":
            path = file_uri_path(uri).resolve()
            if not path.is_relative_to(self.root):
                raise ForbiddenUrl(f"{uri} is outside the storage root {self.root}")
            return self.get(path.relative_to(self.root).as_posix(), max_bytes)
        if scheme == "s3":
            if self._s3 is None:
                self._s3 = _S3Client(self._settings)
            return self._s3.read_uri(uri, max_bytes)
        raise ForbiddenUrl(f"storage cannot read {scheme!r} URIs")


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; some filesystems cannot fsync a directory.
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _classify(exc: Exception) -> str:
    """``missing``, ``transient`` or ``fatal`` for an exception from botocore."""
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _MISSING_CODES or (status == 404 and code != "NoSuchBucket"):
            return "missing"
        if status >= 500 or status == 429 or code in _THROTTLING_CODES:
            return "transient"
        return "fatal"
    if isinstance(exc, BotoConnectionError | HTTPClientError | IncompleteReadError):
        return "transient"
    return "fatal"


class _S3Client:
    """A boto3 S3 client whose errors become imageq errors.

    One request's transient failures (connection resets, 5xx, throttling) are retried by
    botocore's standard retry mode: ``settings.storage_retries`` attempts beyond the
    first, with its own jittered backoff and a per-client retry quota that stops retrying
    when a server stays down. What still fails is a ``TransientError``, and the job
    layer defers and re-runs the whole job: one retry layer per concern.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.max_attempts = max(0, settings.storage_retries) + 1
        # boto3 finds credentials, region and AWS_ENDPOINT_URL itself. This config wins
        # over AWS_RETRY_MODE / AWS_MAX_ATTEMPTS, so the setting is the one knob.
        self.client: Any = boto3.session.Session().client(
            "s3",
            config=Config(
                # botocore's max_attempts counts retries, not the first attempt.
                retries={"mode": "standard", "max_attempts": self.max_attempts - 1},
                connect_timeout=10,
                read_timeout=60,
                signature_version="s3v4",
                # One connection per job thread writing at once (a batch of jobs ends
                # together); at botocore's 10, the rest connect anew for every request.
                max_pool_connections=128,
            ),
        )
        self.light = LightPut(self.client)

    def call(self, what: str, operation: Callable[[], T]) -> T:
        """``operation()``, with botocore's errors mapped to imageq's."""
        try:
            return operation()
        except (BotoCoreError, ClientError) as exc:
            kind = _classify(exc)
            if kind == "missing":
                raise ObjectNotFound(f"{what}: no such object") from None
            if kind == "fatal":
                raise StorageError(f"{what}: {exc}") from None
            raise TransientError(f"{what}: failed after {self._attempts(exc)}: {exc}") from None

    def _attempts(self, exc: Exception) -> str:
        # A service answer says how often botocore retried it; an exception (connection
        # reset, a body cut short) does not, and the retry quota may have cut retries
        # short, so only the bound is known.
        if isinstance(exc, ClientError):
            retried = exc.response.get("ResponseMetadata", {}).get("RetryAttempts")
            if isinstance(retried, int):
                return f"{retried + 1} attempts"
        return f"up to {self.max_attempts} attempts"

    def read(self, bucket: str, key: str, max_bytes: int | None = None) -> bytes:
        def read() -> bytes:
            # The body is read inside call(): a stream that breaks halfway is a
            # TransientError too (botocore retries the request, not the read).
            answer = self.client.get_object(Bucket=bucket, Key=key)
            body = answer["Body"]
            try:
                declared = answer.get("ContentLength")
                if max_bytes is not None and isinstance(declared, int) and declared > max_bytes:
                    raise too_big("the object", max_bytes)
                # Counted as it streams in, whatever the length header said.
                return read_capped(body, max_bytes, "the object")
            finally:
                # Unread bytes are dropped with the connection, never downloaded.
                body.close()

        return self.call(f"get s3://{bucket}/{key}", read)

    def read_uri(self, uri: str, max_bytes: int | None = None) -> bytes:
        bucket, key = _split_s3_uri(uri)
        try:
            return self.read(bucket, key, max_bytes)
        except StorageError as exc:
            # The URI came from a job, so a refusal is the input's problem, not ours.
            raise InputFetchFailed(exc.message) from None


class S3Storage:
    """An S3 bucket (or any S3-compatible server) under an optional key prefix."""

    def __init__(self, bucket: str, prefix: str, settings: Settings) -> None:
        if not bucket:
            raise ValueError("S3Storage needs a bucket")
        self.bucket = bucket
        stripped = prefix.strip("/")
        self.prefix = stripped + "/" if stripped else ""
        self.settings = settings
        self._s3 = _S3Client(settings)

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def put(self, key: str, data: bytes, content_type: str) -> str:
        full = self._key(key)
        if self._s3.light.put(self.bucket, full, data, content_type):
            return self.uri(key)
        self._s3.call(
            f"put {self.uri(key)}",
            lambda: self._s3.client.put_object(
                Bucket=self.bucket, Key=full, Body=data, ContentType=content_type
            ),
        )
        return self.uri(key)

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        return self._s3.read(self.bucket, self._key(key), max_bytes)

    def exists(self, key: str) -> bool:
        full = self._key(key)
        try:
            self._s3.call(
                f"head {self.uri(key)}",
                lambda: self._s3.client.head_object(Bucket=self.bucket, Key=full),
            )
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str) -> builtins.list[str]:
        full = self.prefix + _check_prefix(prefix)

        def listing() -> builtins.list[str]:
            paginator = self._s3.client.get_paginator("list_objects_v2")
            keys: builtins.list[str] = []
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(item["Key"][len(self.prefix) :] for item in page.get("Contents", []))
            return keys

        return sorted(self._s3.call(f"list s3://{self.bucket}/{full}", listing))

    def delete(self, key: str) -> None:
        full = self._key(key)
        self._s3.call(
            f"delete {self.uri(key)}",
            lambda: self._s3.client.delete_object(Bucket=self.bucket, Key=full),
        )

    def public_url(self, key: str) -> str | None:
        # Signed locally: no request reaches the server.
        url: str = self._s3.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=min(self.settings.presign_ttl_s, MAX_PRESIGN_TTL_S),
        )
        return url

    def read_uri(self, uri: str, max_bytes: int | None = None) -> bytes:
        if uri[:5].lower() != "s3://":
            raise ForbiddenUrl(f"S3 storage reads only s3:// URIs, not {uri[:16]!r}…")
        return self._s3.read_uri(uri, max_bytes)


def open_storage(settings: Settings) -> Storage:
    """The storage ``settings.storage_url`` names."""
    url = settings.storage_url
    if url[:7].lower() == "file://":
        # The client's reading of the URL (``~`` included): both name one folder.
        return LocalStorage(local_root(url), settings)
    if url[:5].lower() == "s3://":
        bucket, _, prefix = url[5:].partition("/")
        return S3Storage(bucket, prefix, settings)
    raise ValueError(f"IMAGEQ_STORAGE_URL must be file://... or s3://bucket/prefix, not {url!r}")
