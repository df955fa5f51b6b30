"""Tenants for real: a tenant's job names only what is its own, whatever enqueued it.

Against a real Redis and both storages (a local folder, and S3 on moto): for every
reference field of every kind (as the walker lists them) and every way of naming another
tenant's data, the worker refuses the job with ``forbidden_url`` before its handler runs,
and nothing is read from storage (a counting wrapper; on S3, moto's request log too).
The gateway refuses the same early, and shows tenants ``storage://`` refs, never the
storage root.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from imageq.api_client.errors import ImageqError
from imageq.api_client.kinds import JOB_KINDS
from imageq.api_client.records import RecordStore, connect
from imageq.api_client.references import references
from imageq.api_client.schemas import JobDocument, JobStatus
from imageq.api_client.settings import Settings
from imageq.gateway.app import create_app
from imageq.gateway.cli import tokens_main
from imageq.gateway.tokens import TokenStore
from imageq.workers.io import images as images_module
from imageq.workers.io.images import fetch_bytes
from imageq.workers.io.storage import LocalStorage, S3Storage, Storage
from imageq.workers.runtime.control import JobControl
from imageq.workers.runtime.lifecycle import JobRunner, WorkerContext
from imageq.workers.testing.services import RedisServer
from imageq.workers.webhooks.post import WebhookEvent
from tests.fixtures.s3 import S3Env, S3Server
from tests.helpers import png_bytes

_n = itertools.count()
OK = "https://example.com/ok.png"


class CountingStorage:
    """The real storage, with every read counted (writes pass through)."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.reads: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name in ("get", "list", "exists", "read_uri"):

            def counted(arg: str, *args: Any, **kwargs: Any) -> Any:
                self.reads.append(f"{name} {arg}")
                return attr(arg, *args, **kwargs)

            return counted
        return attr


@dataclass
class FetchingHandler:
    """Stands for every kind's handler: fetches each storage reference it is given."""

    ctx: WorkerContext
    calls: list[str] = field(default_factory=list)

    def handle(self, job: JobDocument, inp: Any, control: JobControl) -> dict[str, Any]:
        self.calls.append(job.id)
        for _path, ref in references(inp):
            if ref.startswith(("s3://", "file://", "storage://")):
                # A refused or missing object is fine here: the reads are what is counted.
                with suppress(ImageqError):
                    fetch_bytes(ref, self.ctx.settings, self.ctx.storage)
        return {"images": [self.ctx.put_output(job.id, "image-0.png", png_bytes(), "image/png")]}


@dataclass
class World:
    runner: JobRunner
    handler: FetchingHandler
    storage: CountingStorage
    store: RecordStore
    settings: Settings
    root: str  # what stored uris start with
    b_upload: str  # the key of tenant B's upload
    a_upload: str
    other_bucket: str  # s3 only: a bucket the worker's credentials also read
    sent: list[WebhookEvent]
    s3_log: Path | None = None

    def s3_reads(self) -> int:
        if self.s3_log is None:
            return 0
        lines = self.s3_log.read_text(errors="replace").splitlines()
        return sum(1 for line in lines if '"GET ' in line or '"HEAD ' in line)


def _world(
    redis_server: RedisServer,
    storage: Storage,
    storage_url: str,
    monkeypatch: pytest.MonkeyPatch,
    **extra: Any,
) -> Iterator[World]:
    settings = Settings.from_env(
        {},
        broker_url=redis_server.url,
        queue_prefix=f"tref{next(_n)}-",
        storage_url=storage_url,
        progress_webhook_interval_s=0.0,
        # The operator lets jobs read local files: a tenant's jobs still may not.
        allow_local_files=True,
    )
    store = RecordStore(connect(redis_server.url), settings)
    counting = CountingStorage(storage)
    read_file = images_module._read_file

    def counted_read_file(ref: str, settings: Settings) -> bytes:
        counting.reads.append(f"file {ref}")
        return read_file(ref, settings)

    monkeypatch.setattr(images_module, "_read_file", counted_read_file)
    sent: list[WebhookEvent] = []
    ctx = WorkerContext(
        settings=settings,
        store=store,
        storage=counting,  # a Storage by its methods (__getattr__)
        send_webhook=sent.append,
        worker_name="w1",
    )
    handler = FetchingHandler(ctx)
    runner = JobRunner(ctx, dict.fromkeys(JOB_KINDS, handler))
    b_upload, a_upload = "uploads/globex/b0b.png", "uploads/acme/a0a.png"
    storage.put(b_upload, png_bytes(), "image/png")
    storage.put(a_upload, png_bytes(), "image/png")
    yield World(
        runner,
        handler,
        counting,
        store,
        settings,
        storage.uri("x")[:-1],
        b_upload,
        a_upload,
        sent=sent,
        **extra,
    )
    runner.close()
    store.redis.close()


@pytest.fixture(params=["local", "s3"])
def world(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[World]:
    if request.param == "local":
        root = tmp_path / "storage"
        yield from _world(
            redis_server,
            LocalStorage(root),
            f"file://{root}",
            monkeypatch,
            other_bucket="elsewhere",
        )
        return
    s3_env: S3Env = request.getfixturevalue("s3_env")
    s3_server: S3Server = request.getfixturevalue("s3_server")
    other = f"other-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=other)
    s3_server.client().put_object(Bucket=other, Key="secret.png", Body=png_bytes())
    url = f"s3://{s3_env.bucket}/deploy"
    settings = Settings.from_env({}, storage_url=url)
    yield from _world(
        redis_server,
        S3Storage(s3_env.bucket, "deploy", settings),
        url,
        monkeypatch,
        other_bucket=other,
        s3_log=s3_server.log,
    )


# -- inputs with one reference field set ----------------------------------------------

TEMPLATES: dict[str, dict[str, Any]] = {
    "caption": {"images": [OK]},
    "match": {"images": [OK], "texts": ["a cat"]},
    "generate": {"prompt": "a cat"},
    "inpaint": {"image": OK, "mask": OK, "prompt": "a cat"},
    "style": {"image": OK, "style_image": OK, "prompt": "a cat"},
    "finetune": {
        "target": "caption",
        "dataset": OK,
        "name": "n1",
        "vocabulary": {"strategy": "replace", "tokenizer": OK},
    },
}


def _every_field() -> list[tuple[str, str]]:
    """(kind, field path) for every reference the walker finds in a full input."""
    found = []
    for kind, spec in JOB_KINDS.items():
        model = spec.input_model.model_validate(TEMPLATES[kind])
        found.extend((kind, path) for path, _ in references(model))
    return found


FIELDS = _every_field()


def test_the_templates_fill_every_reference_field() -> None:
    # The suite below is parametrized from the walker: a field it lists must be in it.
    assert {(k, p.split("[")[0]) for k, p in FIELDS} == {
        ("caption", "input.images"),
        ("match", "input.images"),
        ("inpaint", "input.image"),
        ("inpaint", "input.mask"),
        ("style", "input.image"),
        ("style", "input.style_image"),
        ("finetune", "input.dataset"),
        ("finetune", "input.vocabulary.tokenizer"),
    }


def _input(kind: str, path: str, ref: str) -> dict[str, Any]:
    data = json.loads(json.dumps(TEMPLATES[kind]))
    parts = path.removeprefix("input.").replace("[", ".[").split(".")
    holder: Any = data
    for part in parts[:-1]:
        holder = holder[int(part[1:-1])] if part.startswith("[") else holder[part]
    last = parts[-1]
    if last.startswith("["):
        holder[int(last[1:-1])] = ref
    else:
        holder[last] = ref
    return data


def _run(w: World, kind: str, inp: dict[str, Any], tenant: str | None = "acme") -> Any:
    # A raw message, as any producer could enqueue it: no gateway on the way.
    doc: dict[str, Any] = {"id": str(uuid.uuid4()), "kind": kind, "input": inp}
    if tenant is not None:
        doc["tenant"] = tenant
    return w.runner.execute(doc, "fallback")


def _refused(w: World) -> list[tuple[str, str]]:
    """(what, ref) pairs: each names data that is not tenant acme's; an existing and a
    missing object of each kind."""
    local = w.root.startswith("file://")
    own_root = w.root
    pairs = [
        ("B's upload", f"storage://{w.b_upload}"),
        ("B's missing upload", "storage://uploads/globex/none.png"),
        ("dot-dot", "storage://uploads/acme/../globex/b0b.png"),
        ("root's B upload", own_root + w.b_upload),
        ("root's missing upload", own_root + "uploads/globex/none.png"),
        ("root's uploads/", own_root + "uploads/"),
        ("file root uploads", f"file://{Path('/').resolve()}etc/passwd"),
    ]
    if not local:
        pairs += [
            ("other bucket", f"s3://{w.other_bucket}/secret.png"),
            ("missing key", f"s3://{w.other_bucket}/none.png"),
            ("missing bucket", "s3://no-such-bucket-imageq/secret.png"),
        ]
    return pairs


@pytest.mark.parametrize(("kind", "path"), FIELDS, ids=[f"{k}:{p}" for k, p in FIELDS])
def test_a_tenant_job_naming_others_data_is_refused_before_any_fetch(
    world: World, kind: str, path: str
) -> None:
    before = world.s3_reads()
    messages = set()
    for _what, ref in _refused(world):
        record = _run(world, kind, _input(kind, path, ref))
        assert record is not None and record.status == JobStatus.FAILED, ref
        assert record.error is not None and record.error.code == "forbidden_url", ref
        assert record.error.message.startswith(f"{path}: "), record.error
        messages.add(record.error.message)
    # One answer whatever the object: existing, missing, other bucket, no bucket.
    assert len(messages) == 1
    assert world.handler.calls == []
    assert world.storage.reads == []
    assert world.s3_reads() == before


@pytest.mark.parametrize(("kind", "path"), FIELDS, ids=[f"{k}:{p}" for k, p in FIELDS])
def test_own_uploads_https_and_data_pass(world: World, kind: str, path: str) -> None:
    for ref in (f"storage://{world.a_upload}", OK, "data:image/png;base64,AAAA"):
        record = _run(world, kind, _input(kind, path, ref))
        assert record is not None and record.status == JobStatus.SUCCEEDED, (ref, record.error)
    assert len(world.handler.calls) == 3
    # The counting wrapper sees what a handler reads: the check above is what kept it at 0.
    assert any(world.a_upload in read for read in world.storage.reads)


def test_jobs_without_a_tenant_are_not_restricted(world: World) -> None:
    record = _run(world, "caption", {"images": [world.root + world.b_upload]}, tenant=None)
    assert record is not None and record.status == JobStatus.SUCCEEDED
    assert world.handler.calls and world.storage.reads


def test_an_operator_granted_prefix_is_allowed(world: World) -> None:
    tokens = TokenStore(world.store.redis, world.store)
    granted = world.root + "uploads/globex/"
    tokens.create("acme", allow_prefixes=[granted])
    assert tokens.tenants()[0]["allow_prefixes"] == [granted]
    record = _run(world, "caption", {"images": [world.root + world.b_upload]})
    assert record is not None and record.status == JobStatus.SUCCEEDED, record.error
    escape = world.root + "uploads/globex/../acme/a0a.png"
    record = _run(world, "caption", {"images": [escape]})
    assert record is not None and record.error is not None
    assert record.error.code == "forbidden_url"
    # Another tenant's job gains nothing from acme's grant.
    record = _run(world, "caption", {"images": [world.root + world.b_upload]}, tenant="initech")
    assert record is not None and record.error is not None
    assert record.error.code == "forbidden_url"
    # Withdrawn, it stops opening references within the shipped cache time.
    assert world.settings.gateway_token_cache_s == Settings().gateway_token_cache_s == 1.0
    tokens.create("acme", allow_prefixes=[])
    time.sleep(world.settings.gateway_token_cache_s + 0.1)
    record = _run(world, "caption", {"images": [world.root + world.b_upload]})
    assert record is not None and record.error is not None
    assert record.error.code == "forbidden_url"


def test_tokens_create_takes_repeated_allow_prefix(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMAGEQ_BROKER_URL", world.settings.broker_url)
    monkeypatch.setenv("IMAGEQ_QUEUE_PREFIX", world.settings.queue_prefix)
    argv = ["create", "acme", "--allow-prefix", "S3://b/one/", "--allow-prefix", "file:///d/"]
    assert tokens_main(argv) == 0
    assert tokens_main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert listed[0]["allow_prefixes"] == ["file:///d/", "s3://b/one/"]
    assert world.runner.grants.grants("acme") == ("file:///d/", "s3://b/one/")
    assert tokens_main(["create", "acme", "--allow-prefix", "s3://b/../x/"]) == 2


def test_webhooks_of_tenant_jobs_name_files_by_storage_refs(world: World) -> None:
    doc = {
        "id": str(uuid.uuid4()),
        "kind": "caption",
        "input": {"images": [OK]},
        "tenant": "acme",
        "webhook": {"url": "https://example.com/hook", "events": ["job.succeeded"]},
    }
    record = world.runner.execute(doc, "fallback")
    assert record is not None and record.status == JobStatus.SUCCEEDED
    # Stored as before (presigning reads the s3:// uri) ...
    assert record.result_uri == world.root + f"jobs/{doc['id']}/result.json"
    # ... shown to the tenant without the root.
    (event,) = world.sent
    assert event.data["result_uri"] == f"storage://jobs/{doc['id']}/result.json"
    assert event.data["output"]["images"][0]["uri"] == f"storage://jobs/{doc['id']}/image-0.png"
    assert world.root not in json.dumps(event.data)
    # result.json, which the tenant downloads by its presigned URL, alike.
    stored = world.storage.inner.get(f"jobs/{doc['id']}/result.json").decode()
    assert world.root not in stored
    assert json.loads(stored)["result_uri"] == f"storage://jobs/{doc['id']}/result.json"


# -- the gateway --------------------------------------------------------------------


def test_the_gateway_refuses_early_and_shows_no_storage_root(world: World) -> None:
    token = TokenStore(world.store.redis, world.store).create("acme")
    headers = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(world.settings)) as http:
        refused = {
            "kind": "caption",
            "input": {"images": [OK, world.root + world.b_upload]},
        }
        answer = http.post("/v1/jobs", json=refused, headers=headers)
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error["code"] == "forbidden_url" and error["field"] == "input.images[1]"
        answer = http.post(
            "/v1/jobs",
            json={"kind": "inpaint", "input": _input("inpaint", "input.mask", "s3://x/y.png")},
            headers=headers,
        )
        assert answer.status_code == 422 and answer.json()["error"]["field"] == "input.mask"
        ok = {"kind": "caption", "input": {"images": [f"storage://{world.a_upload}"]}}
        answer = http.post("/v1/jobs", json=ok, headers=headers)
        assert answer.status_code == 201, answer.text
        job_id = answer.json()["id"]
        # A worker runs it (no Celery here) ...
        document = world.store.get_document(job_id)
        assert document is not None
        world.runner.execute(document, "fallback")
        # ... and its tenant reads it back without the root.
        shown = http.get(f"/v1/jobs/{job_id}", headers=headers).json()
        assert shown["status"] == "succeeded", shown
        assert shown["result_uri"] == f"storage://jobs/{job_id}/result.json"
        assert shown["output"]["images"][0]["uri"] == f"storage://jobs/{job_id}/image-0.png"
        assert world.root not in json.dumps(shown)
        listed = http.get("/v1/jobs", headers=headers).json()["data"]
        assert world.root not in json.dumps(listed)
