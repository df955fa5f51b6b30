"""Jobs enqueued by other Celery clients (a bare Python Celery app, Node's celery-node):
known from the moment they are enqueued, followed, waited for and canceled via Client."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from celery import Celery

from imageq.api_client.celery_config import celery_config
from imageq.api_client.errors import NotFound
from imageq.api_client.names import celery_priority, job_queue, task_name
from imageq.workers.runtime.jobstate import JobState
from imageq.workers.testing.services import wait_until
from tests.fixtures.services import Stack
from tests.helpers import png_uri

NODE_DIR = Path(__file__).resolve().parents[1] / "node"


@pytest.fixture(scope="module")
def stack(
    make_stack: Callable[..., Stack], tiny_caption_model: Path, tiny_match_model: Path
) -> Stack:
    s = make_stack(
        IMAGEQ_MODEL_CAPTION=str(tiny_caption_model), IMAGEQ_MODEL_MATCH=str(tiny_match_model)
    )
    s.worker("webhooks", "webhooks@raw")
    return s


def _raw_app(stack: Stack) -> Celery:
    app = Celery("raw-producer", set_as_current=False)
    app.conf.update(celery_config(stack.settings))
    return app


def _send_raw(stack: Stack, kind: str, inp: dict, priority: int = 5) -> str:
    job_id = str(uuid.uuid4())
    doc = {"id": job_id, "kind": kind, "input": inp}
    app = _raw_app(stack)
    try:
        app.send_task(
            task_name(kind),
            args=[doc],
            task_id=job_id,
            queue=job_queue(kind, stack.settings.queue_prefix),
            priority=celery_priority(priority),
        )
    finally:
        app.close()
    return job_id


def test_a_raw_message_is_known_and_cancelable_before_any_worker_takes_it(stack: Stack) -> None:
    first = _send_raw(stack, "caption", {"image": png_uri((10, 200, 10))})
    second = _send_raw(stack, "caption", {"image": png_uri((200, 10, 10))})
    urgent = _send_raw(stack, "caption", {"image": png_uri((10, 10, 200))}, priority=9)
    # No caption worker yet: the messages only sit in the queue, with no record.
    assert stack.store.get(first) is None
    a, b, c = (stack.client.get(i) for i in (first, second, urgent))
    assert (a.status, b.status, c.status) == ("queued", "queued", "queued")
    assert (a.kind, a.attempt) == ("caption", 0)
    # The urgent one runs first, then the first one sent, then the second.
    assert (c.queue_position, a.queue_position, b.queue_position) == (0, 1, 2)
    # Read once, it is recorded: later reads (and workers) find the record.
    assert stack.store.get(first) is not None
    canceled = stack.client.cancel(second)
    assert canceled.status == "canceled" and canceled.error is not None
    with pytest.raises(NotFound):
        stack.client.get(str(uuid.uuid4()))

    stack.worker("caption", "caption@raw")
    done = stack.client.wait(first, timeout_s=60)
    assert done.status == "succeeded" and done.attempt == 1
    assert stack.client.wait(urgent, timeout_s=60).status == "succeeded"
    # The worker that took the canceled job's message ended it without running it.
    wait_until(lambda: JobState(stack.store).done_once(second, "result.json"), 30, "result.json")
    ended = stack.client.get(second)
    assert ended.status == "canceled" and ended.attempt == 0 and ended.output is None
    result = json.loads(stack.storage_path("jobs", second, "result.json").read_text())
    assert result["status"] == "canceled"


def test_a_node_producer_enqueues_and_client_follows(stack: Stack) -> None:
    # Fails, never skips, without them: scripts/setup.sh (CI's too) installs both.
    assert shutil.which("node") is not None, "node is missing: run scripts/setup.sh"
    assert (NODE_DIR / "node_modules" / "celery-node").is_dir(), (
        "tests/node's celery-node is missing: run scripts/setup.sh (npm ci in tests/node)"
    )
    if not any(w.kind == "caption" for w in stack.workers):
        stack.worker("caption", "caption@raw")
    stack.worker("match", "match@raw")

    def node_send(kind: str, inp: dict) -> str:
        doc = {"id": str(uuid.uuid4()), "kind": kind, "input": inp}
        out = subprocess.run(
            [
                "node",
                str(NODE_DIR / "enqueue.js"),
                stack.settings.broker_url,
                job_queue(kind, stack.settings.queue_prefix),
                task_name(kind),
                json.dumps(doc),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert out.stdout.strip() == doc["id"]
        return doc["id"]

    caption = node_send("caption", {"image": png_uri((120, 40, 40))})
    match = node_send("match", {"image": png_uri((40, 120, 40)), "texts": ["a cat", "a dog"]})
    record = stack.client.wait(caption, timeout_s=60)
    assert record.status == "succeeded", record.error
    assert record.output is not None and record.output["captions"][0]["text"]
    matched = stack.client.wait(match, timeout_s=60)
    assert matched.status == "succeeded", matched.error
    assert matched.output is not None and len(matched.output["scores"][0]["itm"]) == 2
