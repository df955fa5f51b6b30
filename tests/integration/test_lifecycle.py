"""The job lifecycle against a real Redis, without Celery: exactly-once effect."""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imageq.api_client.cli import main as cli_main
from imageq.api_client.error_details import ErrorDetails
from imageq.api_client.errors import ModelError
from imageq.api_client.records import RecordStore, connect, new_record
from imageq.api_client.schemas import JobDocument, JobStatus
from imageq.api_client.settings import Settings
from imageq.api_client.webhooks import event_id
from imageq.workers.io.storage import LocalStorage, StorageError
from imageq.workers.runtime.control import JobControl
from imageq.workers.runtime.jobstate import JobState
from imageq.workers.runtime.lifecycle import Deferred, JobRunner, WorkerContext
from imageq.workers.testing.services import RedisServer
from imageq.workers.webhooks.post import WebhookEvent

_n = itertools.count()


class FakeHandler:
    def __init__(self) -> None:
        self.calls = 0
        self.steps = 0
        self.fail_with: Exception | None = None
        self.cancel_at_step: int | None = None
        self.runner: JobRunner | None = None

    def handle(self, job: JobDocument, inp: Any, control: JobControl) -> dict[str, Any]:
        self.calls += 1
        if self.fail_with is not None:
            raise self.fail_with
        for step in range(1, self.steps + 1):
            if self.cancel_at_step == step:
                control.store.request_cancel(job.id)
            control(step, self.steps, {"stage": "denoising"})
        return {"captions": [{"index": 0, "text": "a thing"}]}


@pytest.fixture
def env(redis_server: RedisServer, tmp_path: Path) -> Iterator[tuple[JobRunner, FakeHandler, list]]:
    settings = Settings.from_env(
        {},
        broker_url=redis_server.url,
        queue_prefix=f"life{next(_n)}-",
        storage_url=f"file://{tmp_path}",
        max_attempts=2,
        progress_webhook_interval_s=0.0,
    )
    store = RecordStore(connect(redis_server.url), settings)
    sent: list[WebhookEvent] = []
    ctx = WorkerContext(
        settings=settings,
        store=store,
        storage=LocalStorage(tmp_path),
        send_webhook=sent.append,
        worker_name="w1",
        model_id="tiny",
    )
    handler = FakeHandler()
    runner = JobRunner(ctx, {"caption": handler})
    yield runner, handler, sent
    store.redis.close()


def _doc(**extra: Any) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "kind": "caption",
        "input": {"image": "https://example.com/x.png"},
        "webhook": {
            "url": "https://example.com/hook",
            "events": [
                "job.succeeded",
                "job.failed",
                "job.canceled",
                "job.progress",
                "job.started",
            ],
        },
        **extra,
    }


def test_success_then_redelivery_is_a_no_op(env: tuple) -> None:
    runner, handler, sent = env
    doc = _doc()
    record = runner.execute(doc, "fallback")
    assert record is not None and record.status == "succeeded" and record.attempt == 1
    assert record.metrics["run_s"] is not None and record.metrics["queue_s"] is not None
    result = runner.ctx.storage.get(f"jobs/{doc['id']}/result.json")
    assert json.loads(result)["status"] == "succeeded"
    assert [e.type for e in sent] == ["job.started", "job.succeeded"]
    # the same message again (a redelivery): nothing runs, nothing is sent twice
    assert runner.execute(doc, "fallback") is None
    assert handler.calls == 1
    assert [e.type for e in sent] == ["job.started", "job.succeeded"]


def test_redelivery_completes_side_effects_a_crash_skipped(env: tuple) -> None:
    runner, handler, sent = env
    doc = _doc()
    store: RecordStore = runner.store
    store.create(new_record(doc), doc)
    # the worker died after recording success, before result.json and the webhook
    store.finish(doc["id"], JobStatus.SUCCEEDED, output={"captions": []})
    runner.execute(doc, "fallback")
    runner.execute(doc, "fallback")
    assert handler.calls == 0
    assert runner.ctx.storage.exists(f"jobs/{doc['id']}/result.json")
    assert [e.type for e in sent] == ["job.succeeded"]
    record = store.get(doc["id"])
    assert record is not None
    assert sent[0].webhook_id == event_id(doc["id"], "job.succeeded", record.created_at)


def test_live_lease_defers_a_second_delivery(env: tuple) -> None:
    runner, handler, _ = env
    doc = _doc()
    runner.store.create(new_record(doc), doc)
    assert JobState(runner.store).acquire_lease(doc["id"], "other-worker/1")
    with pytest.raises(Deferred):
        runner.execute(doc, "fallback")
    assert handler.calls == 0


def test_job_that_keeps_killing_its_worker_ends_worker_lost(env: tuple) -> None:
    runner, handler, sent = env
    doc = _doc()
    store: RecordStore = runner.store
    store.create(new_record(doc), doc)
    store.update(
        doc["id"], lambda r: r.model_copy(update={"status": JobStatus.RUNNING, "attempt": 2})
    )
    record = runner.execute(doc, "fallback")
    assert record is not None and record.status == "failed"
    assert record.error is not None and record.error.code == "worker_lost"
    assert handler.calls == 0
    assert sent[-1].type == "job.failed"


def test_cancel_before_start_and_during_steps(env: tuple) -> None:
    runner, handler, sent = env
    doc = _doc()
    runner.store.create(new_record(doc), doc)
    runner.store.request_cancel(doc["id"])
    record = runner.execute(doc, "fallback")
    assert record is not None and record.status == "canceled" and handler.calls == 0

    handler.steps, handler.cancel_at_step = 10, 4
    doc2 = _doc()
    record = runner.execute(doc2, "fallback")
    assert record is not None and record.status == "canceled"
    assert record.progress is not None and record.progress["step"] == 4
    assert record.output is None
    progress = [e for e in sent if e.type == "job.progress" and e.data["id"] == doc2["id"]]
    assert progress and len({e.webhook_id for e in progress}) == len(progress)


def test_timeout_and_model_error_and_invalid_document(env: tuple) -> None:
    runner, handler, _ = env
    handler.steps = 3

    def slow(job: JobDocument, inp: Any, control: JobControl) -> dict[str, Any]:
        time.sleep(0.3)
        control(1, 3)
        return {}

    runner.handlers["caption"] = type("Slow", (), {"handle": staticmethod(slow)})()
    record = runner.execute(_doc(timeout_s=0.1), "fallback")
    assert record is not None and record.error is not None and record.error.code == "timeout"

    runner.handlers["caption"] = handler
    handler.fail_with = ModelError("boom")
    record = runner.execute(_doc(), "fallback")
    assert record is not None and record.error is not None
    assert record.error.model_dump() == {"code": "model_error", "message": "boom"}

    runner.execute({"kind": "caption", "input": {}}, "task-id-1")
    bad = runner.store.get("task-id-1")
    assert bad is not None and bad.status == "failed" and bad.error is not None
    assert bad.error.code == "invalid_input" and "input.images" in bad.error.message
    runner.execute("not even a dict", "task-id-2")
    other = runner.store.get("task-id-2")
    assert other is not None and other.error is not None
    assert other.error.code == "invalid_input"


def test_unexpected_errors_reach_the_record_as_an_error_id_only(
    env: tuple,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner, handler, sent = env
    handler.fail_with = OSError("/srv/models/secret-path: endpoint https://internal.example")
    doc = _doc()
    with caplog.at_level(logging.ERROR, logger="imageq.errors"):
        record = runner.execute(doc, "fallback")
    assert record is not None and record.error is not None and record.error.code == "internal"
    match = re.fullmatch(r"internal error \(error id ([0-9a-f]{12})\)", record.error.message)
    assert match is not None, record.error.message
    error_id = match.group(1)
    # Nothing of the exception in the record, result.json or the webhook.
    result = runner.ctx.storage.get(f"jobs/{doc['id']}/result.json").decode()
    for text in (record.model_dump_json(), result, json.dumps([e.to_dict() for e in sent])):
        assert "secret-path" not in text and "internal.example" not in text
        assert "OSError" not in text
    assert error_id in result
    # The log has the id and the traceback; operators read the detail by the id.
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None and "secret-path" in logged[0].getMessage()
    detail = ErrorDetails(runner.store).get(error_id)
    assert detail is not None and detail["job_id"] == doc["id"] and detail["type"] == "OSError"
    assert "secret-path" in detail["message"] and "Traceback" in detail["traceback"]
    # `imageq errors show ID`, from the same deployment's settings.
    monkeypatch.setenv("IMAGEQ_BROKER_URL", runner.settings.broker_url)
    monkeypatch.setenv("IMAGEQ_QUEUE_PREFIX", runner.settings.queue_prefix)
    capsys.readouterr()
    assert cli_main(["errors", "show", error_id]) == 0
    assert json.loads(capsys.readouterr().out)["type"] == "OSError"
    assert cli_main(["errors", "show", "0" * 12]) == 2
    kept_s = runner.store.redis.ttl(runner.store.keys.error(error_id))
    assert 0 < kept_s <= runner.settings.result_ttl_s  # as long as the record, no longer
    # An internal failure raised as an imageq error (storage's "no such bucket") too.
    handler.fail_with = StorageError("put s3://private-bucket/x: AccessDenied")
    record = runner.execute(_doc(), "fallback")
    assert record is not None and record.error is not None
    assert "private-bucket" not in record.error.message and "error id" in record.error.message


def test_a_tenants_job_over_its_max_priority_fails_as_invalid_input(env: tuple) -> None:
    runner, handler, sent = env
    store: RecordStore = runner.store
    store.redis.hset(store.keys.gateway_tenant("acme"), "max_priority", "3")
    assert runner.settings.gateway_default_max_priority == 5
    over = _doc(tenant="acme", priority=4)
    record = runner.execute(over, "fallback")
    assert record is not None and record.status == "failed" and record.error is not None
    assert record.error.code == "invalid_input" and record.error.message.startswith("priority:")
    assert "maximum of 3" in record.error.message and handler.calls == 0
    assert json.loads(runner.ctx.storage.get(f"jobs/{over['id']}/result.json"))["status"] == (
        "failed"
    )
    assert sent[-1].type == "job.failed"
    # At its cap it runs; a tenant with no cap of its own has the default (5); a job
    # with no tenant (its producer holds Redis) has none.
    ok = runner.execute(_doc(tenant="acme", priority=3), "f")
    assert ok is not None and ok.status == "succeeded"
    default = runner.execute(_doc(tenant="globex", priority=6), "f")
    assert default is not None and default.error is not None
    assert default.error.code == "invalid_input"
    trusted = runner.execute(_doc(priority=9), "f")
    assert trusted is not None and trusted.status == "succeeded"
