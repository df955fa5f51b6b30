"""Match jobs end to end: a real match worker on a tiny random BLIP-ITM, through the queue."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from imageq.api_client.errors import InvalidInput
from imageq.api_client.schemas import JobRecord
from imageq.workers.testing.services import wait_until
from tests.fixtures.services import Stack
from tests.helpers import ImageServer, image_server, png_bytes, png_uri

TEXTS = [
    "a dog on the grass",
    "two men riding bikes near a tree",
    "a cat",
    "a red bus parked on the street",
]
IMAGES = [
    png_uri((200, 30, 30), (48, 40)),
    png_uri((30, 30, 200), (64, 64)),
    png_uri((20, 180, 60), (30, 90)),
]


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    with image_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def stack(make_stack: Callable[..., Stack], tiny_match_model: Path) -> Stack:
    # A long batch wait lets jobs that arrive together share a pass; a lone job never
    # waits for it (the batcher only waits while another job is on its way).
    s = make_stack(IMAGEQ_MODEL_MATCH=str(tiny_match_model), IMAGEQ_MAX_BATCH_WAIT_MS="2000")
    s.worker("match", "match@e2e")
    return s


@pytest.fixture(scope="module")
def full(stack: Stack) -> JobRecord:
    """One 3 x 4 job, shared by the tests that read its scores."""
    record = stack.client.wait(stack.client.match(images=IMAGES, texts=TEXTS).id, 60)
    assert record.status == "succeeded", record.error
    return record


def _succeeded(stack: Stack, job_id: str) -> dict[str, Any]:
    record = stack.client.wait(job_id, 60)
    assert record.status == "succeeded", record.error
    assert record.output is not None
    return record.output


def test_score_matrix_shape_ranges_and_best(stack: Stack, full: JobRecord) -> None:
    output = full.output
    assert output is not None
    assert output["texts"] == TEXTS
    assert output["truncated"] == []
    assert output["max_text_tokens"] == 512
    scores = output["scores"]
    assert [s["index"] for s in scores] == [0, 1, 2]
    for entry in scores:
        itm, cosine = entry["itm"], entry["cosine"]
        assert len(itm) == len(cosine) == len(TEXTS)
        assert all(0.0 <= p <= 1.0 for p in itm)
        assert all(-1.0 <= c <= 1.0 for c in cosine)
        # Random weights still tell these texts apart: no constant placeholder output.
        assert len(set(itm)) == len(set(cosine)) == len(TEXTS)
        best = entry["best"]
        j = best["text_index"]
        assert itm[j] == max(itm)
        assert best == {"text_index": j, "text": TEXTS[j], "itm": itm[j], "cosine": cosine[j]}
    # Different images score differently.
    assert scores[0]["itm"] != scores[1]["itm"]
    assert full.model == stack.settings.model_match
    metrics = full.metrics
    assert metrics["images"] == 3 and metrics["texts"] == 4 and metrics["pairs"] == 12
    # The job's three images ran in one pass.
    assert metrics["batch_size"] == 3
    stored = json.loads(stack.storage_path("jobs", full.id, "result.json").read_text())
    assert stored["status"] == "succeeded" and stored["output"] == output


def test_same_pair_alone_or_in_a_larger_job(stack: Stack, full: JobRecord) -> None:
    assert full.output is not None
    pairs = [(0, 0), (1, 3), (2, 1), (2, 2)]
    jobs = [stack.client.match(image=IMAGES[i], texts=[TEXTS[j]]) for i, j in pairs]
    for (i, j), job in zip(pairs, jobs, strict=True):
        alone = _succeeded(stack, job.id)["scores"][0]
        in_full = full.output["scores"][i]
        assert alone["itm"][0] == pytest.approx(in_full["itm"][j], abs=1e-5)
        assert alone["cosine"][0] == pytest.approx(in_full["cosine"][j], abs=1e-5)
        assert alone["best"]["text_index"] == 0 and alone["best"]["text"] == TEXTS[j]


def test_long_text_is_cut_to_the_tokenizer_limit(stack: Stack, full: JobRecord) -> None:
    limit = full.output["max_text_tokens"] if full.output else 0
    room = limit - 2  # [CLS] and [SEP]
    long = " ".join(["a"] * 1000)  # 1999 characters (the schema allows 2000), 1000 tokens
    cut = " ".join(["a"] * room)
    assert len(long) <= 2000 and room < 1000
    output = _succeeded(stack, stack.client.match(image=IMAGES[0], texts=[long, cut, "a cat"]).id)
    assert output["truncated"] == [0]
    scores = output["scores"][0]
    assert scores["itm"][0] == pytest.approx(scores["itm"][1], abs=1e-5)
    assert scores["cosine"][0] == pytest.approx(scores["cosine"][1], abs=1e-5)


def test_limits_are_accepted_at_the_edge(stack: Stack) -> None:
    many_images = stack.client.match(images=[png_uri((9, 9, 9), (8, 8))] * 512, texts=["a cat"])
    many_texts = stack.client.match(image=IMAGES[1], texts=[f"a cat {i}" for i in range(64)])
    output = _succeeded(stack, many_images.id)
    assert len(output["scores"]) == 512
    assert {s["itm"][0] for s in output["scores"]} == {output["scores"][0]["itm"][0]}
    output = _succeeded(stack, many_texts.id)
    assert len(output["scores"][0]["itm"]) == 64


@pytest.mark.parametrize(
    ("field", "value", "where"),
    [
        ("texts", [f"t{i}" for i in range(65)], "input.texts"),
        ("texts", [], "input.texts"),
        ("texts", ["a cat", ""], "input.texts[1]"),
        ("texts", ["   ", "a cat"], "input.texts"),
        ("texts", ["x" * 2001], "input.texts[0]"),
        ("images", [png_uri((1, 1, 1), (4, 4))] * 513, "input.images"),
        ("images", [], "input.images"),
    ],
    ids=["65-texts", "no-texts", "empty-text", "blank-text", "long-text", "513-images", "none"],
)
def test_limits_refused_as_invalid_input(
    stack: Stack, field: str, value: list[str], where: str
) -> None:
    fields: dict[str, Any] = {"images": [IMAGES[0]], "texts": ["a cat"], field: value}
    # The client refuses before anything is queued ...
    with pytest.raises(InvalidInput, match=re.escape(where)):
        stack.client.match(**fields)
    # ... and a worker refuses the same document sent as a raw Celery message.
    job_id = f"raw-match-{uuid.uuid4().hex}"
    app = Celery("other-backend", broker=stack.settings.broker_url)
    app.conf.update(task_serializer="json", accept_content=["json"])
    try:
        app.send_task(
            "imageq.match",
            args=[{"id": job_id, "kind": "match", "input": fields}],
            task_id=job_id,
            queue=stack.settings.queue_prefix + "match",
        )
    finally:
        app.close()
    wait_until(lambda: getattr(stack.store.get(job_id), "status", None) == "failed", 30, "failure")
    record = stack.client.get(job_id)
    assert record.error is not None and record.error.code == "invalid_input"
    assert field in record.error.message
    assert stack.workers[0].alive()


def test_text_without_tokens_is_refused_by_the_worker(stack: Stack) -> None:
    # Zero-width characters pass the schema's blank check but leave the tokenizer nothing.
    job = stack.client.match(image=IMAGES[0], texts=["a cat", "\u200b\u200b"])
    record = stack.client.wait(job.id, 60)
    assert record.status == "failed"
    assert record.error is not None and record.error.code == "invalid_input"
    assert "input.texts[1]" in record.error.message
    assert stack.workers[0].alive()


def test_bad_image_in_a_batch_fails_only_its_job(
    stack: Stack, images: ImageServer, full: JobRecord
) -> None:
    """Four jobs fetch at once and meet in the batcher; the corrupt one fails alone."""
    assert full.output is not None
    colours = [(200, 30, 30), (30, 30, 200), (20, 180, 60)]
    for k, colour in enumerate(colours):
        images.files[f"/good-{k}.png"] = png_bytes(colour, (48, 40))
        images.slow[f"/good-{k}.png"] = 1.0
    images.files["/bad.png"] = png_bytes()[:60]  # a truncated PNG
    images.slow["/bad.png"] = 1.0
    good = [
        stack.client.match(image=images.url(f"/good-{k}.png"), texts=TEXTS)
        for k in range(len(colours))
    ]
    bad = stack.client.match(
        images=[images.url("/good-0.png"), images.url("/bad.png")], texts=TEXTS
    )
    failed = stack.client.wait(bad.id, 60)
    assert failed.status == "failed"
    assert failed.error is not None and failed.error.code == "invalid_input"
    assert "input.images[1]" in failed.error.message
    for k, job in enumerate(good):
        record = stack.client.wait(job.id, 60)
        assert record.status == "succeeded", record.error
        # It shared its pass with another job that arrived with it ...
        assert record.metrics["batch_size"] >= 2
        assert record.output is not None
        scores = record.output["scores"][0]
        # ... and scored exactly as (48 x 40, same colour) image 0 did alone.
        if k == 0:
            assert scores["itm"] == pytest.approx(full.output["scores"][0]["itm"], abs=1e-5)
            assert scores["cosine"] == pytest.approx(full.output["scores"][0]["cosine"], abs=1e-5)
    assert stack.workers[0].alive()
    after = stack.client.match(image=IMAGES[2], texts=["a cat"])
    assert stack.client.wait(after.id, 60).status == "succeeded"
