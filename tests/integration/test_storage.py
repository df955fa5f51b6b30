"""LocalStorage on a temp folder and S3Storage against moto's S3 server on loopback."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from botocore.awsrequest import AWSResponse
from botocore.retries.standard import ExponentialBackoff

from imageq.api_client.errors import (
    ForbiddenUrl,
    ImageqError,
    InputFetchFailed,
    InvalidInput,
    TransientError,
)
from imageq.api_client.settings import Settings
from imageq.workers.io import storage as storage_module
from imageq.workers.io.images import fetch_bytes
from imageq.workers.io.storage import LocalStorage, ObjectNotFound, S3Storage, Storage, open_storage
from tests.fixtures.s3 import S3Env, S3Server

FAST = Settings(storage_retries=2)


def exercise(store: Storage) -> None:
    """The contract every backend keeps."""
    uri = store.put("jobs/j1/result.json", b'{"ok":true}', "application/json")
    assert uri == store.uri("jobs/j1/result.json")
    store.put("jobs/j1/out-0.png", b"png0", "image/png")
    store.put("jobs/j10/out-0.png", b"other job", "image/png")
    store.put("adapters/a/weights.bin", b"w", "application/octet-stream")
    assert store.get("jobs/j1/result.json") == b'{"ok":true}'
    assert store.read_uri(uri) == b'{"ok":true}'
    assert store.exists("jobs/j1/out-0.png") and not store.exists("jobs/j1/nope.png")
    assert store.list("jobs/j1/") == ["jobs/j1/out-0.png", "jobs/j1/result.json"]
    assert store.list("jobs/j1") == [
        "jobs/j1/out-0.png",
        "jobs/j1/result.json",
        "jobs/j10/out-0.png",
    ]
    assert store.list("nothing/") == []
    store.put("jobs/j1/out-0.png", b"png0 v2", "image/png")  # overwrite
    assert store.get("jobs/j1/out-0.png") == b"png0 v2"
    store.delete("jobs/j1/out-0.png")
    store.delete("jobs/j1/out-0.png")  # deleting twice is fine
    assert not store.exists("jobs/j1/out-0.png")
    with pytest.raises(ObjectNotFound):
        store.get("jobs/j1/out-0.png")
    for bad in ("../escape", "jobs/../../escape", "/etc/passwd", "", "jobs//x", "jobs/./x"):
        with pytest.raises(InvalidInput):
            store.put(bad, b"x", "text/plain")


# --- local ---------------------------------------------------------------------------


def test_local_storage_contract(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "data")
    exercise(store)
    assert store.public_url("jobs/j1/result.json") is None
    assert store.uri("jobs/j1/result.json") == (tmp_path / "data/jobs/j1/result.json").as_uri()


def test_local_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStorage(tmp_path)
    store.put("jobs/j/result.json", b"old", "application/json")
    target = tmp_path / "jobs/j/result.json"
    seen: list[tuple[Path, bytes]] = []
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        # At the moment of the rename the full new content sits in a temp file beside it,
        # and the target still holds the old content.
        seen.append((Path(src), Path(src).read_bytes()))
        assert Path(dst) == target and target.read_bytes() == b"old"
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    store.put("jobs/j/result.json", b"new" * 1000, "application/json")
    assert target.read_bytes() == b"new" * 1000
    assert seen[0][0].parent == target.parent and seen[0][1] == b"new" * 1000

    def crash(src: Any, dst: Any) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        store.put("jobs/j/result.json", b"half", "application/json")
    assert target.read_bytes() == b"new" * 1000
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]


def test_local_paths_cannot_escape_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)
    store = LocalStorage(root)
    with pytest.raises(InvalidInput):
        store.get("link/secret")
    with pytest.raises(InvalidInput):
        store.put("link/new", b"x", "text/plain")
    assert not (outside / "new").exists()
    with pytest.raises(ForbiddenUrl):
        store.read_uri((outside / "secret").as_uri())
    with pytest.raises(ForbiddenUrl):
        store.read_uri("gopher://x/y")


def test_local_list_hides_unfinished_temp_files(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put("jobs/j/a.png", b"a", "image/png")
    (tmp_path / "jobs/j/.imageq-tmp-abc").write_bytes(b"half")
    assert store.list("jobs/") == ["jobs/j/a.png"]


def test_open_storage_reads_the_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    store = open_storage(Settings())  # file://~/imageq-data
    assert isinstance(store, LocalStorage) and store.root == tmp_path / "imageq-data"
    absolute = open_storage(Settings(storage_url=f"file://{tmp_path}/abs"))
    assert isinstance(absolute, LocalStorage) and absolute.root == tmp_path / "abs"
    s3 = open_storage(Settings(storage_url="s3://bucket/some/prefix/"))
    assert isinstance(s3, S3Storage)
    assert s3.uri("jobs/j/result.json") == "s3://bucket/some/prefix/jobs/j/result.json"
    with pytest.raises(ValueError, match="IMAGEQ_STORAGE_URL"):
        open_storage(Settings(storage_url="ftp://x/y"))


# --- S3 ------------------------------------------------------------------------------


def test_s3_storage_contract(s3_env: S3Env) -> None:
    store = S3Storage(s3_env.bucket, "pre/fix", FAST)
    exercise(store)
    assert store.uri("jobs/j1/result.json") == f"s3://{s3_env.bucket}/pre/fix/jobs/j1/result.json"


def test_s3_keys_live_under_the_prefix(s3_env: S3Env, s3_server: S3Server) -> None:
    S3Storage(s3_env.bucket, "deploy-a", FAST).put("jobs/j/r.json", b"a", "application/json")
    listed = s3_server.client().list_objects_v2(Bucket=s3_env.bucket)["Contents"]
    assert [o["Key"] for o in listed] == ["deploy-a/jobs/j/r.json"]
    assert S3Storage(s3_env.bucket, "deploy-b", FAST).list("jobs/") == []


def test_presigned_url_serves_the_bytes(s3_env: S3Env) -> None:
    store = S3Storage(s3_env.bucket, "", FAST.with_(presign_ttl_s=600))
    payload = bytes(range(256)) * 10
    store.put("jobs/j/out.png", payload, "image/png")
    url = store.public_url("jobs/j/out.png")
    assert url is not None and url.startswith(s3_env.endpoint_url)
    assert "X-Amz-Expires=600" in url
    response = requests.get(url, timeout=10)
    assert response.status_code == 200 and response.content == payload
    assert response.headers["content-type"] == "image/png"


def test_read_uri_reaches_other_buckets(s3_env: S3Env, s3_server: S3Server) -> None:
    other = s3_env.bucket + "-in"
    s3_server.client().create_bucket(Bucket=other)
    s3_server.client().put_object(Bucket=other, Key="in/cat.png", Body=b"cat")
    store = S3Storage(s3_env.bucket, "out", FAST)
    assert store.read_uri(f"s3://{other}/in/cat.png") == b"cat"
    # A local deployment reads s3:// inputs too, and fetch_bytes goes through storage.
    local = LocalStorage(Path("unused"), FAST)
    assert local.read_uri(f"s3://{other}/in/cat.png") == b"cat"
    assert fetch_bytes(f"s3://{other}/in/cat.png", FAST, store) == b"cat"
    with pytest.raises(InputFetchFailed, match="no such object"):
        store.read_uri(f"s3://{other}/in/dog.png")
    with pytest.raises(InputFetchFailed):
        store.read_uri(f"s3://{other}-missing/in/cat.png")
    with pytest.raises(InvalidInput):
        store.read_uri(f"s3://{other}")
    with pytest.raises(ForbiddenUrl):
        store.read_uri("file:///etc/passwd")


def test_a_jobs_input_cannot_tell_a_missing_bucket_from_a_missing_key(
    s3_env: S3Env, s3_server: S3Server
) -> None:
    other = s3_env.bucket + "-in"
    s3_server.client().create_bucket(Bucket=other)
    store = S3Storage(s3_env.bucket, "out", FAST)
    answers = []
    for ref in (f"s3://{other}/in/dog.png", f"s3://{other}-missing/in/dog.png"):
        with pytest.raises(ImageqError) as caught:
            fetch_bytes(ref, FAST, store)
        answers.append((caught.value.code, caught.value.message.replace(ref, "REF")))
    assert answers[0] == answers[1]
    assert answers[0][0] == "input_fetch_failed"


class Backoffs:
    """botocore's standard-mode backoff, recorded and (``skip``) not waited for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, skip: bool) -> None:
        self.delays: list[float] = []
        real = ExponentialBackoff.delay_amount

        def delay_amount(backoff: ExponentialBackoff, context: Any) -> float:
            delay = float(real(backoff, context))
            self.delays.append(delay)
            return 0.0 if skip else delay

        monkeypatch.setattr(ExponentialBackoff, "delay_amount", delay_amount)


def count_sends(store: S3Storage, operation: str) -> list[int]:
    """How many times botocore sends ``operation``'s request, retries included."""
    sent = [0]

    def before_send(**_: Any) -> None:
        sent[0] += 1

    store._s3.client.meta.events.register(f"before-send.s3.{operation}", before_send)
    return sent


def test_s3_server_down_is_a_transient_error_after_retries(
    s3_env: S3Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the block ends
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    backoffs = Backoffs(monkeypatch, skip=False)
    store = S3Storage(s3_env.bucket, "", FAST.with_(storage_retries=3))
    sent = count_sends(store, "PutObject")
    with pytest.raises(TransientError, match="after up to 4 attempts"):
        store.put("jobs/j/r.json", b"x", "application/json")
    # botocore's standard mode: the first attempt, 3 retries, a backoff before each.
    assert sent[0] == 4 and len(backoffs.delays) == 3
    assert all(0 <= delay <= 1 for delay in backoffs.delays)


class FlakyServer:
    """Answers the first ``failures`` GetObject requests with an S3 error, as a server
    would, before they reach the network; later ones go to the real server."""

    def __init__(self, failures: list[tuple[int, str]]) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self, request: Any, **_: Any) -> AWSResponse | None:
        self.calls += 1
        if not self.failures:
            return None
        status, code = self.failures.pop(0)
        body = f"<Error><Code>{code}</Code><Message>{code}</Message></Error>".encode()
        return AWSResponse(request.url, status, {"content-type": "application/xml"}, Raw(body))


class Raw:
    """The raw body botocore reads an answer from."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.body


def test_throttling_and_5xx_are_retried_other_errors_are_not(
    s3_env: S3Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    Backoffs(monkeypatch, skip=True)  # throttling backs off for seconds
    store = S3Storage(s3_env.bucket, "", FAST)
    store.put("k", b"v", "text/plain")
    flaky = FlakyServer([(503, "SlowDown"), (500, "InternalError")])
    store._s3.client.meta.events.register("before-send.s3.GetObject", flaky)
    assert store.get("k") == b"v" and flaky.calls == 3
    flaky.failures = [(403, "AccessDenied")]
    with pytest.raises(storage_module.StorageError, match="AccessDenied"):
        store.get("k")
    assert flaky.calls == 4
    # More failures in a row than retries: a TransientError that says how many tries.
    flaky.failures = [(503, "SlowDown")] * 3
    with pytest.raises(TransientError, match="after 3 attempts"):
        store.get("k")
    assert flaky.calls == 7


# --- byte caps: reads stop past them ---------------------------------------------------


class CountingBody:
    """An S3 body that counts what is read from it."""

    def __init__(self, body: Any) -> None:
        self.body = body
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        chunk: bytes = self.body.read(size) if size >= 0 else self.body.read()
        self.read_bytes += len(chunk)
        return chunk

    def close(self) -> None:
        self.body.close()


def test_read_capped_stops_one_byte_past_the_cap() -> None:
    import io

    stream = io.BytesIO(b"x" * (50 * 1024 * 1024))
    with pytest.raises(InvalidInput, match="larger than the limit of 1000 bytes"):
        storage_module.read_capped(stream, 1000, "the object")
    assert stream.tell() == 1001
    assert storage_module.read_capped(io.BytesIO(b"abc"), 3, "x") == b"abc"


def test_s3_reads_past_the_cap_fail_without_reading_the_object(
    s3_env: S3Env, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = S3Storage(s3_env.bucket, "", FAST)
    big = b"\x89PNG" + bytes(8 * 1024 * 1024)
    store.put("uploads/big.png", big, "image/png")
    bodies: list[CountingBody] = []
    real = store._s3.client.get_object

    def get_object(*, hide_length: bool = False, **kwargs: Any) -> Any:
        answer = dict(real(**kwargs))
        bodies.append(CountingBody(answer["Body"]))
        answer["Body"] = bodies[-1]
        if hide_length:
            answer.pop("ContentLength", None)
        return answer

    monkeypatch.setattr(store._s3.client, "get_object", get_object)
    small = FAST.with_(max_image_bytes=1000)
    # The length header alone refuses it: not one byte of the body read.
    with pytest.raises(InvalidInput, match="larger than the limit of 1000 bytes"):
        fetch_bytes("storage://uploads/big.png", small, store)
    with pytest.raises(InvalidInput, match="larger than the limit of 1000 bytes"):
        fetch_bytes(f"s3://{s3_env.bucket}/uploads/big.png", small, store)
    assert [b.read_bytes for b in bodies] == [0, 0]
    # Without (or despite) the header, the count stops one byte past the cap.
    monkeypatch.setattr(
        store._s3.client, "get_object", lambda **kw: get_object(hide_length=True, **kw)
    )
    with pytest.raises(InvalidInput, match="larger than the limit of 1000 bytes"):
        store.get("uploads/big.png", 1000)
    assert bodies[-1].read_bytes == 1001
    assert store.get("uploads/big.png", len(big)) == big
    assert store.get("uploads/big.png") == big  # no cap: as before


def test_local_reads_past_the_cap_fail(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put("uploads/big.png", bytes(3 * 1024 * 1024), "image/png")
    with pytest.raises(InvalidInput, match="larger than the limit of 1000 bytes"):
        store.get("uploads/big.png", 1000)
    assert len(store.get("uploads/big.png", 3 * 1024 * 1024)) == 3 * 1024 * 1024
    with pytest.raises(InvalidInput, match="larger than the limit of 20971520 bytes"):
        fetch_bytes("storage://uploads/x.png", Settings(), _Huge(tmp_path))


class _Huge(LocalStorage):
    """Storage whose object is past the shipped cap (20 MiB), read only through its cap."""

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        assert max_bytes == Settings().max_image_bytes == 20 * 1024 * 1024
        return storage_module.read_capped(_Endless(), max_bytes, "the object")


class _Endless:
    def read(self, size: int = -1) -> bytes:
        assert 0 <= size <= 1024 * 1024  # never "everything"
        return bytes(size)
