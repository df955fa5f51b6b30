"""The job lifecycle against a real Redis, without Celery: exactly-once effect."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api_client.errors import ModelError
from api_client.records import RecordStore, connect, new_record
from api_client.schemas import JobDocument, JobStatus
from api_client.settings import Settings
from api_client.webhooks import event_id
from workers.io.storage import LocalStorage
from workers.runtime.control import JobControl
from workers.runtime.jobstate import JobState
from workers.runtime.lifecycle import Deferred, JobRunner, WorkerContext
from workers.testing.services import RedisServer
from workers.webhooks.post import WebhookEvent

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
