"""Usage: each job's model time, summed per tenant, kind and day, once per job."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from imageq.api_client.client import Client
from imageq.api_client.records import RecordStore, connect, new_record
from imageq.api_client.schemas import JobDocument, JobStatus
from imageq.api_client.settings import Settings
from imageq.api_client.usage import NO_TENANT, UsageLedger
from imageq.gateway.app import create_app
from imageq.gateway.tokens import TokenStore
from imageq.workers.io.storage import LocalStorage
from imageq.workers.runtime.control import JobControl
from imageq.workers.runtime.lifecycle import JobRunner, WorkerContext
from imageq.workers.testing.services import RedisServer

_n = itertools.count()


class Charging:
    """Charges ``model_s`` (as the batcher does for its calls), then succeeds or fails."""

    def __init__(self, model_s: float, fail: bool = False) -> None:
        self.model_s = model_s
        self.fail = fail

    def handle(self, job: JobDocument, inp: Any, control: JobControl) -> dict[str, Any]:
        control.charge_model(self.model_s)
        if self.fail:
            raise RuntimeError("the model broke")
        return {"captions": []}


@pytest.fixture
def settings(redis_server: RedisServer, tmp_path: Path) -> Settings:
    return Settings.from_env(
        {},
        broker_url=redis_server.url,
        queue_prefix=f"usage{next(_n)}-",
        storage_url=f"file://{tmp_path}",
    )


@pytest.fixture
def store(settings: Settings) -> Iterator[RecordStore]:
    store = RecordStore(connect(settings.broker_url), settings)
    yield store
    store.redis.close()


def runner(store: RecordStore, tmp_path: Path, handler: Any) -> JobRunner:
    ctx = WorkerContext(
        settings=store.settings,
        store=store,
        storage=LocalStorage(tmp_path),
        send_webhook=lambda event: None,
        worker_name="w",
        model_id="tiny",
    )
    return JobRunner(ctx, {"caption": handler})


def doc(tenant: str | None) -> dict[str, Any]:
    document: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "kind": "caption",
        "input": {"image": "https://example.com/x.png"},
    }
    if tenant is not None:
        document["tenant"] = tenant
    return document


def usage(store: RecordStore, tenant: str) -> dict[str, tuple[int, float]]:
    return {r.kind: (r.jobs, r.model_s) for r in UsageLedger(store).rows(tenant)}


def test_a_job_is_charged_its_model_time_once(store: RecordStore, tmp_path: Path) -> None:
    run = runner(store, tmp_path, Charging(0.25))
    job = doc("acme")
    record = run.execute(job, "t")
    assert record is not None and record.metrics["model_s"] == 0.25
    # A redelivery, a sweeper's finalize: nothing is counted twice.
    assert run.execute(job, "t") is None
    run.finalize(job["id"])
    assert usage(store, "acme") == {"caption": (1, 0.25)}


def test_failed_jobs_pay_for_their_model_time_and_tenants_stay_apart(
    store: RecordStore, tmp_path: Path
) -> None:
    runner(store, tmp_path, Charging(0.5, fail=True)).execute(doc("acme"), "t")
    runner(store, tmp_path, Charging(0.125)).execute(doc("globex"), "t")
    runner(store, tmp_path, Charging(0.125)).execute(doc("globex"), "t")
    runner(store, tmp_path, Charging(1.0)).execute(doc(None), "t")
    assert usage(store, "acme") == {"caption": (1, 0.5)}
    assert usage(store, "globex") == {"caption": (2, 0.25)}
    assert usage(store, NO_TENANT) == {"caption": (1, 1.0)}
    everyone = {(r.tenant, r.kind): (r.jobs, r.model_s) for r in UsageLedger(store).rows()}
    assert everyone == {
        ("acme", "caption"): (1, 0.5),
        ("globex", "caption"): (2, 0.25),
        (NO_TENANT, "caption"): (1, 1.0),
    }


def test_a_job_ended_without_running_counts_with_no_model_time(
    store: RecordStore, tmp_path: Path
) -> None:
    job = doc("acme")
    store.create(new_record(job), job)
    store.request_cancel(job["id"])  # canceled before any worker took it
    store.finish(job["id"], JobStatus.CANCELED)
    runner(store, tmp_path, Charging(9.0)).finalize(job["id"])
    assert usage(store, "acme") == {"caption": (1, 0.0)}


def test_usage_is_kept_for_the_shipped_days(store: RecordStore, tmp_path: Path) -> None:
    assert Settings().usage_keep_days == 400
    job = doc("acme")
    record = runner(store, tmp_path, Charging(0.25)).execute(job, "t")
    assert record is not None and record.finished_at is not None
    key = UsageLedger(store).day_key("acme", record.finished_at[:10])
    assert 399 * 86400 < store.redis.ttl(key) <= 400 * 86400


def test_the_gateway_shows_a_tenant_only_its_own_usage(
    store: RecordStore, settings: Settings, tmp_path: Path
) -> None:
    runner(store, tmp_path, Charging(0.25)).execute(doc("acme"), "t")
    runner(store, tmp_path, Charging(2.0)).execute(doc("globex"), "t")
    tokens = TokenStore(store.redis, store)
    acme = tokens.create("acme")
    with TestClient(create_app(settings)) as http:
        answer = http.get("/v1/usage", headers={"Authorization": f"Bearer {acme}"})
        assert answer.status_code == 200, answer.text
        rows = answer.json()["data"]
        assert [(r["kind"], r["jobs"], r["model_s"]) for r in rows] == [("caption", 1, 0.25)]
        bad = http.get("/v1/usage?since=yesterday", headers={"Authorization": f"Bearer {acme}"})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_input"
        assert http.get("/v1/usage").status_code == 401
    with Client(settings) as client:
        assert {r.tenant for r in client.usage()} == {"acme", "globex"}
