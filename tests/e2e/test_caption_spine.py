"""The spine end to end: real Redis, real worker processes started through the CLI."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import Celery
from standardwebhooks.webhooks import Webhook

from imageq.api_client.errors import IdempotencyConflict, InvalidInput
from imageq.workers.testing.services import WebhookReceiver, wait_until
from tests.fixtures.services import Stack
from tests.helpers import ImageServer, image_server, png_bytes, png_uri


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    with image_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def stack(make_stack: Callable[..., Stack], tiny_caption_model: Path) -> Stack:
    s = make_stack(IMAGEQ_MODEL_CAPTION=str(tiny_caption_model))
    s.worker("webhooks", "webhooks@spine")
    s.worker("caption", "caption-a@spine")
    return s


def test_caption_through_client_with_signed_webhook(
    stack: Stack, receiver: WebhookReceiver, webhook_secret: str
) -> None:
    job = stack.client.caption(
        images=[png_uri((200, 30, 30)), png_uri((30, 30, 200))],
        webhook={"url": receiver.url("/spine"), "events": ["job.started", "job.succeeded"]},
        metadata={"customer": "acme"},
    )
    assert job.status == "queued"
    record = stack.client.wait(job.id, timeout_s=60)
    assert record.status == "succeeded", record.error
    assert record.attempt == 1
    assert record.worker == "caption-a@spine"
    assert record.model == stack.settings.model_caption
    assert record.metadata == {"customer": "acme"}
    assert record.metrics["queue_s"] >= 0 and record.metrics["run_s"] > 0
    assert record.metrics["batch_size"] >= 1
    captions = record.output["captions"]
    assert [c["index"] for c in captions] == [0, 1]
    assert all(isinstance(c["text"], str) and c["text"] for c in captions)
    # result.json beside the outputs, equal to the final record
    stored = json.loads(stack.storage_path("jobs", job.id, "result.json").read_text())
    assert stored["status"] == "succeeded" and stored["output"] == record.output
    assert record.result_uri and record.result_uri.endswith(f"jobs/{job.id}/result.json")
    # signed webhooks, verified with the independent standardwebhooks package
    deliveries = receiver.wait_for(
        lambda d: d.path == "/spine" and d.json()["data"]["id"] == job.id, count=2
    )
    verifier = Webhook(webhook_secret)
    types = []
    for d in deliveries:
        payload = verifier.verify(d.body, d.headers)
        types.append(payload["type"])
    assert sorted(types) == ["job.started", "job.succeeded"]
    final = next(d for d in deliveries if d.json()["type"] == "job.succeeded")
    assert final.json()["data"]["output"] == record.output


def test_generation_options(stack: Stack) -> None:
    image = png_uri((10, 200, 10))
    greedy = stack.client.caption(image=image)
    beams = stack.client.caption(
        image=image, generation={"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 8}
    )
    sampled = stack.client.caption(
        image=image,
        prompt="a picture of",
        generation={"do_sample": True, "top_k": 5, "num_return_sequences": 3, "max_new_tokens": 6},
    )
    g = stack.client.wait(greedy.id, 60)
    b = stack.client.wait(beams.id, 60)
    s = stack.client.wait(sampled.id, 60)
    assert g.status == b.status == s.status == "succeeded"
    assert len(b.output["captions"][0]["texts"]) == 2
    texts = s.output["captions"][0]["texts"]
    assert len(texts) == 3
    assert all(t.startswith("a picture of") for t in texts)


def test_bare_celery_client_by_task_name(stack: Stack) -> None:
    """A backend in another codebase: plain Celery, the task name and the queue."""
    app = Celery("other-backend", broker=stack.settings.broker_url)
    app.conf.update(task_serializer="json", accept_content=["json"])
    job_id = "bare-celery-0001"
    app.send_task(
        "imageq.caption",
        args=[{"id": job_id, "kind": "caption", "input": {"image": png_uri()}}],
        task_id=job_id,
        queue=stack.settings.queue_prefix + "caption",
    )
    wait_until(lambda: stack.store.get(job_id) is not None, 30, "record")
    record = stack.client.wait(job_id, 60)
    assert record.status == "succeeded"
    assert record.output["captions"][0]["text"]
    app.close()


def test_raw_message_with_invalid_document_fails_cleanly(stack: Stack) -> None:
    app = Celery("other-backend", broker=stack.settings.broker_url)
    app.conf.update(task_serializer="json", accept_content=["json"])
    job_id = "bare-celery-bad-1"
    app.send_task(
        "imageq.caption",
        args=[{"id": job_id, "kind": "caption", "input": {"images": []}, "bogus": 1}],
        task_id=job_id,
        queue=stack.settings.queue_prefix + "caption",
    )
    wait_until(lambda: getattr(stack.store.get(job_id), "status", None) == "failed", 30, "failure")
    record = stack.client.get(job_id)
    assert record.error is not None and record.error.code == "invalid_input"
    assert "images" in record.error.message and "bogus" in record.error.message
    assert stack.storage_path("jobs", job_id, "result.json").exists()
    app.close()


def test_invalid_input_refused_before_enqueue(stack: Stack) -> None:
    with pytest.raises(InvalidInput, match=r"input\.generation\.num_beams"):
        stack.client.caption(image=png_uri(), generation={"num_beams": 99})
    with pytest.raises(InvalidInput, match=r"input\.images"):
        stack.client.caption(images=[])


def test_duplicate_idempotency_key_returns_first_job(stack: Stack) -> None:
    first = stack.client.caption(image=png_uri(), idempotency_key="order-1234")
    second = stack.client.caption(image=png_uri(), idempotency_key="order-1234")
    assert first.id == second.id
    # The same key for a different document is a mistake, not a replay (Stripe's rule).
    with pytest.raises(IdempotencyConflict, match="idempotency_key"):
        stack.client.caption(image=png_uri((1, 2, 3)), idempotency_key="order-1234")
    record = stack.client.wait(first.id, 60)
    assert record.status == "succeeded" and record.attempt == 1
    third = stack.client.caption(image=png_uri(), idempotency_key="order-1234")
    assert third.id == first.id and third.status == "succeeded"


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/corrupt.png", "invalid_input"),
        ("/bomb.png", "invalid_input"),
        ("/notimage.png", "invalid_input"),
        ("/missing.png", "input_fetch_failed"),
    ],
)
def test_bad_images_fail_with_their_code_and_worker_survives(
    stack: Stack, images: ImageServer, path: str, code: str
) -> None:
    from tests.helpers import bomb_png

    images.files["/corrupt.png"] = png_bytes()[:40]
    images.files["/bomb.png"] = bomb_png()
    images.files["/notimage.png"] = b"%PDF-1.4 not an image at all"
    worker = stack.workers[-1]
    job = stack.client.caption(image=images.url(path))
    record = stack.client.wait(job.id, 60)
    assert record.status == "failed"
    assert record.error is not None and record.error.code == code, record.error
    assert "input.images[0]" in record.error.message
    assert worker.alive()
    ok = stack.client.wait(stack.client.caption(image=png_uri()).id, 60)
    assert ok.status == "succeeded"


def test_cancel_of_a_queued_job(
    make_stack: Callable[..., Stack], tiny_caption_model: Path, receiver: WebhookReceiver
) -> None:
    """No caption worker serves this stack yet, so the job is queued when it is canceled."""
    lonely = make_stack(IMAGEQ_MODEL_CAPTION=str(tiny_caption_model))
    lonely.worker("webhooks", "webhooks@lonely")
    job = lonely.client.caption(image=png_uri(), webhook=receiver.url("/cancel"))
    canceled = lonely.client.cancel(job.id)
    assert canceled.status == "canceled"
    assert canceled.error is not None and canceled.error.code == "canceled"
    event = receiver.wait_for(lambda d: d.path == "/cancel" and d.json()["data"]["id"] == job.id)
    assert event[0].json()["type"] == "job.canceled"
    wait_until(
        lambda: lonely.storage_path("jobs", job.id, "result.json").exists(), 20, "result.json"
    )
    # A worker that arrives later drops the message without running it.
    lonely.worker("caption", "caption@lonely")
    probe = lonely.client.caption(image=png_uri())
    assert lonely.client.wait(probe.id, 60).status == "succeeded"
    after = lonely.client.get(job.id)
    assert after.status == "canceled" and after.attempt == 0 and after.output is None
    time.sleep(0.5)
    assert len(receiver.for_job(job.id)) == 1


def test_raw_message_with_wrong_arguments_fails_cleanly(stack: Stack) -> None:
    app = Celery("other-backend", broker=stack.settings.broker_url)
    app.conf.update(task_serializer="json", accept_content=["json"])
    job_id = "bare-celery-args-1"
    app.send_task(
        "imageq.caption",
        args=[{"id": job_id}, "extra"],
        kwargs={"x": 1},
        task_id=job_id,
        queue=stack.settings.queue_prefix + "caption",
    )
    wait_until(lambda: getattr(stack.store.get(job_id), "status", None) == "failed", 30, "failure")
    record = stack.client.get(job_id)
    assert record.error is not None and record.error.code == "invalid_input"
    assert "exactly one argument" in record.error.message
    assert stack.workers[-1].alive()
    app.close()


def test_multi_image_progress_in_record_and_webhooks(
    stack: Stack, receiver: WebhookReceiver
) -> None:
    # Images of different sizes land in several batches (max 8 images a batch here).
    images = [png_uri((i * 20 % 255, 90, 40), size=(40 + i, 40)) for i in range(12)]
    job = stack.client.caption(
        images=images,
        webhook={"url": receiver.url("/progress"), "events": ["job.progress", "job.succeeded"]},
    )
    record = stack.client.wait(job.id, timeout_s=60)
    assert record.status == "succeeded", record.error
    assert record.progress is not None
    assert record.progress["images_done"] == record.progress["images"] == 12
    assert record.progress["stage"] == "captioning"
    final = receiver.wait_for(
        lambda d: (
            d.path == "/progress"
            and d.json()["type"] == "job.succeeded"
            and d.json()["data"]["id"] == job.id
        )
    )
    assert final
    events = [
        d.json()["data"]["progress"]
        for d in receiver.deliveries
        if d.path == "/progress"
        and d.json()["data"]["id"] == job.id
        and d.json()["type"] == "job.progress"
    ]
    assert events, "no job.progress event for a 12-image job"
    done = [e["images_done"] for e in events]
    assert done == sorted(done) and done[-1] == 12


def test_seeded_sampling_is_reproducible_alone_or_in_a_batch(stack: Stack) -> None:
    image = png_uri((120, 60, 200))
    generation = {"do_sample": True, "top_k": 0, "temperature": 1.5, "max_new_tokens": 10}
    seeded = {**generation, "seed": 42}
    alone = stack.client.caption(image=image, generation=seeded)
    together = stack.client.caption(images=[png_uri((10, 10, 10)), image, image], generation=seeded)
    other = stack.client.caption(image=image, generation={**generation, "seed": 43})
    records = [stack.client.wait(j.id, timeout_s=60) for j in (alone, together, other)]
    assert all(r.status == "succeeded" for r in records), [r.error for r in records]
    text = records[0].output["captions"][0]["text"]
    assert [c["text"] for c in records[1].output["captions"][1:]] == [text, text]
    assert records[2].output["captions"][0]["text"] != text
