"""Micro-batching through real caption workers: same captions, shared passes, faults.

Jobs are made to overlap by serving their images slowly from a local HTTP server:
every job is then in flight (announced to the batcher) while the others arrive, so a
batch forms without depending on luck. A second worker runs with simulated faults
injected from outside the project's code: a ``sitecustomize`` module on its
``PYTHONPATH`` wraps the caption predictor so that a batch larger than three images
raises a CUDA out-of-memory error and an image of one colour breaks any batch it is in.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imageq.api_client.schemas import JobRecord
from imageq.workers.testing.services import WorkerProcess
from tests.fixtures.services import Stack
from tests.helpers import ImageServer, image_server, png_bytes

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]
POISON = (13, 13, 13)
OOM_ABOVE = 3
SLOW_S = 0.6

FAULTS = f'''
"""Test-only faults for one caption worker (see tests/e2e/test_batching.py)."""
import imageq.workers.predictors.blip as _blip
import imageq.workers.predictors.caption as _caption

_original = _caption.CaptionPredictor._run
_pixels = _blip.BlipPredictor._pixels
# Job threads keep only an image's tensor (the decoded image leaves before the batch):
# a poisoned image's tensor carries this mark into the batch.
_MARK = 1313.0


def _marked_pixels(self, image):
    pixels = _pixels(self, image)
    if image.convert("RGB").getpixel((0, 0)) == {POISON!r}:
        pixels = pixels.clone().fill_(_MARK)
    return pixels


def _poisoned(item):
    if item.pixels is not None:
        return float(item.pixels.flatten()[0]) == _MARK
    return item.image.getpixel((0, 0)) == {POISON!r}


def _run(self, items):
    if any(_poisoned(item) for item in items):
        raise RuntimeError("simulated fault: a poisoned image in the batch")
    if len(items) > {OOM_ABOVE}:
        import torch

        raise torch.OutOfMemoryError(f"simulated CUDA out of memory at {{len(items)}} images")
    return _original(self, items)


_blip.BlipPredictor._pixels = _marked_pixels
_caption.CaptionPredictor._run = _run
'''


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    with image_server() as srv:
        for i, color in enumerate([*COLORS, POISON]):
            srv.files[f"/c{i}.png"] = png_bytes(color)
            srv.files[f"/slow{i}.png"] = png_bytes(color)
            srv.slow[f"/slow{i}.png"] = SLOW_S
        srv.files["/broken.png"] = b"\x89PNG\r\n\x1a\n not really a png"
        srv.slow["/broken.png"] = SLOW_S
        yield srv


@pytest.fixture(scope="module")
def stack(make_stack: Callable[..., Stack], tiny_caption_model: Path) -> Stack:
    # The batch waits only for jobs already on their way, so a long wait costs nothing.
    s = make_stack(
        IMAGEQ_MODEL_CAPTION=str(tiny_caption_model),
        IMAGEQ_MAX_BATCH_IMAGES="8",
        IMAGEQ_MAX_BATCH_WAIT_MS="1500",
    )
    s.worker("caption", "caption@batching")
    return s


@pytest.fixture(scope="module")
def faulty(make_stack: Callable[..., Stack], tiny_caption_model: Path) -> tuple[Stack, Path]:
    s = make_stack(
        IMAGEQ_MODEL_CAPTION=str(tiny_caption_model),
        IMAGEQ_MAX_BATCH_IMAGES="8",
        IMAGEQ_MAX_BATCH_WAIT_MS="1500",
    )
    hooks = s.tmp / "faults"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(FAULTS)
    path = os.pathsep.join(p for p in (str(hooks), s.env.get("PYTHONPATH", "")) if p)
    worker = s.worker("caption", "caption@faulty", PYTHONPATH=path)
    return s, worker.log_path


def _submit_all(stack: Stack, inputs: list[dict[str, Any]]) -> list[JobRecord]:
    ids = [stack.client.caption(**inp).id for inp in inputs]
    return [stack.client.wait(job_id, 90) for job_id in ids]


def _text(record: JobRecord) -> str:
    assert record.status == "succeeded", record.error
    return str(record.output["captions"][0]["text"])


@pytest.fixture(scope="module")
def alone(stack: Stack, images: ImageServer) -> dict[int, str]:
    """Each colour's caption from a job that ran by itself (one image in its pass)."""
    captions = {}
    for i in range(len(COLORS)):
        record = stack.client.wait(stack.client.caption(image=images.url(f"/c{i}.png")).id, 60)
        assert record.metrics["batch_size"] == 1
        captions[i] = _text(record)
    return captions


def test_jobs_in_flight_together_share_a_pass_and_get_the_captions_they_get_alone(
    stack: Stack, images: ImageServer, alone: dict[int, str]
) -> None:
    order = [0, 1, 2, 3, 4, 0]
    records = _submit_all(stack, [{"image": images.url(f"/slow{i}.png")} for i in order])
    assert [_text(r) for r in records] == [alone[i] for i in order]
    sizes = [r.metrics["batch_size"] for r in records]
    assert max(sizes) >= 4, f"jobs in flight together should share a pass, got {sizes}"
    # A multi-image job keeps its own order inside the shared pass.
    many = _submit_all(
        stack,
        [{"images": [images.url(f"/slow{i}.png") for i in (4, 2, 0)]}]
        + [{"image": images.url(f"/slow{i}.png")} for i in (1, 3)],
    )
    texts = [c["text"] for c in many[0].output["captions"]]
    assert texts == [alone[4], alone[2], alone[0]]
    assert many[0].metrics["batch_size"] >= 4


def test_jobs_with_different_generation_options_never_share_a_pass(
    stack: Stack, images: ImageServer
) -> None:
    short = {"max_new_tokens": 4}
    beams = {"max_new_tokens": 6, "num_beams": 2}
    inputs = [
        {"image": images.url(f"/slow{i}.png"), "generation": options}
        for i, options in enumerate([short, beams, short, beams, short, beams])
    ]
    records = _submit_all(stack, inputs)
    for options in (short, beams):
        group = [r for r, inp in zip(records, inputs, strict=True) if inp["generation"] is options]
        sizes = [r.metrics["batch_size"] for r in group]
        assert all(r.status == "succeeded" for r in group)
        # Six jobs in flight, three of each kind: a mixed pass would be larger than 3.
        assert max(sizes) <= 3, f"options {options} shared a pass with other options: {sizes}"
        assert max(sizes) >= 2, f"jobs with equal options should still share: {sizes}"


def test_a_broken_image_fails_only_its_own_job(
    stack: Stack, images: ImageServer, alone: dict[int, str]
) -> None:
    records = _submit_all(
        stack,
        [{"image": images.url("/slow0.png")}, {"image": images.url("/broken.png")}]
        + [{"image": images.url(f"/slow{i}.png")} for i in (1, 2)],
    )
    bad = records[1]
    assert bad.status == "failed" and bad.error is not None
    assert bad.error.code == "invalid_input" and "input.images[0]" in bad.error.message
    assert [_text(r) for r in (records[0], records[2], records[3])] == [alone[i] for i in (0, 1, 2)]
    assert max(r.metrics["batch_size"] for r in records if r.status == "succeeded") >= 2
    assert stack.workers[0].alive()


def test_an_image_that_breaks_its_batch_fails_only_its_job(
    faulty: tuple[Stack, Path], images: ImageServer, alone: dict[int, str]
) -> None:
    stack, _ = faulty
    poison = len(COLORS)
    records = _submit_all(stack, [{"image": images.url(f"/slow{i}.png")} for i in (0, poison, 1)])
    bad = records[1]
    assert bad.status == "failed" and bad.error is not None
    assert bad.error.code == "model_error" and "poisoned" in bad.error.message
    assert [_text(records[0]), _text(records[2])] == [alone[0], alone[1]]
    assert stack.workers[0].alive()


def test_out_of_memory_halves_the_batch_and_backs_off_for_a_while(
    faulty: tuple[Stack, Path], images: ImageServer, alone: dict[int, str]
) -> None:
    stack, log_path = faulty
    order = [0, 1, 2, 3, 4, 0]

    def ooms() -> list[str]:
        return re.findall(r"out of memory at batch \d+; retrying at \d+", log_path.read_text())

    before = len(ooms())
    records = _submit_all(stack, [{"image": images.url(f"/slow{i}.png")} for i in order])
    assert [_text(r) for r in records] == [alone[i] for i in order]
    assert all(r.metrics["batch_size"] <= OOM_ABOVE for r in records)
    split = ooms()[before:]
    assert split, "six jobs in flight should have formed a batch over the memory limit"
    assert max(r.metrics["batch_size"] for r in records) >= 2

    # The lower size stays for this batch key for RECOVER_AFTER (50) calls: the same
    # load again splits up front, no new OOM.
    again = _submit_all(stack, [{"image": images.url(f"/slow{i}.png")} for i in order])
    assert [_text(r) for r in again] == [alone[i] for i in order]
    assert len(ooms()) == before + len(split)
    assert all(r.metrics["batch_size"] <= OOM_ABOVE for r in again)
    worker: WorkerProcess = stack.workers[0]
    assert worker.alive()
