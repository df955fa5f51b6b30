"""Step previews: decoders, the per-job publisher, the predictor's per-job slices.

Run with ``-p tests.fixtures.diffusion_models``.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from imageq.api_client.inputs import GenerateInput, InpaintInput, StyleInput
from imageq.api_client.schemas import EVENTS, WebhookSpec
from imageq.api_client.settings import Settings
from imageq.api_client.webhooks import event_id, preview_key
from imageq.workers.kinds.diffusion_previews import PreviewPublisher
from imageq.workers.predictors.diffusion import DiffusionPredictor, GenerateJob
from imageq.workers.predictors.previews import (
    PREVIEW_SIDE,
    SD15_LATENT_RGB,
    LinearDecoder,
    TinyDecoder,
    open_decoder,
    preview_jpeg,
)

REF = "data:image/png;base64,AA=="


def noop(step: int, total: int, info: dict[str, Any]) -> None:
    return None


class Sink:
    """A preview sink that is always due and keeps what it was offered."""

    def __init__(self) -> None:
        self.offers: list[tuple[int, int, torch.Tensor]] = []

    def due(self) -> bool:
        return True

    def offer(self, step: int, total: int, latents: Any) -> None:
        self.offers.append((step, total, latents))


class Inline(Executor):
    """An executor that runs what it is given at once (deterministic publisher tests)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- decoders ------------------------------------------------------------------------


def test_linear_decoder_applies_the_sd15_factors() -> None:
    latents = torch.zeros(4, 2, 3)
    latents[0] = 1.0  # channel 0 alone: its row of factors, mapped from [-1, 1] to 0..255
    image = LinearDecoder().decode(latents)
    assert image.size == (3, 2)
    expected = [round((f + 1) * 127.5) for f in SD15_LATENT_RGB[0]]
    assert np.asarray(image)[0, 0].tolist() == expected


def test_preview_jpeg_fits_the_long_side_and_decodes() -> None:
    image = LinearDecoder().decode(torch.randn(4, 64, 128))
    wide = Image.open(io.BytesIO(preview_jpeg(image, (128, 64))))
    assert (wide.format, wide.size) == ("JPEG", (PREVIEW_SIDE, PREVIEW_SIDE // 2))
    small = Image.open(
        io.BytesIO(preview_jpeg(LinearDecoder().decode(torch.randn(4, 8, 8)), (8, 8)))
    )
    assert small.size == (64, 64)  # never larger than the output itself


def test_tiny_autoencoder_decodes_previews(tiny_taesd: Path) -> None:
    decoder = open_decoder(str(tiny_taesd))
    assert isinstance(decoder, TinyDecoder)
    assert isinstance(open_decoder(""), LinearDecoder)
    latents = torch.randn(4, 8, 8)
    image = decoder.decode(latents)
    assert image.size == (64, 64)  # TAESD upsamples 8x, as SD's VAE
    again = np.asarray(decoder.decode(latents))
    other = np.asarray(decoder.decode(torch.randn(4, 8, 8)))
    assert (np.asarray(image) == again).all() and (np.asarray(image) != other).any()
    jpeg = Image.open(io.BytesIO(preview_jpeg(image, (8, 8))))
    assert jpeg.size == (64, 64)


# -- the publisher ---------------------------------------------------------------------


def publisher(
    interval_s: float, store: Callable[[bytes], dict[str, Any]] | None = None
) -> tuple[PreviewPublisher, list[dict[str, Any]], Clock, list[bytes]]:
    published: list[dict[str, Any]] = []
    stored: list[bytes] = []

    def keep(data: bytes) -> dict[str, Any]:
        stored.append(data)
        return {"uri": "file:///s/jobs/j/preview.jpg"}

    clock = Clock()
    pub = PreviewPublisher(
        LinearDecoder(), Inline(), store or keep, published.append, interval_s, clock
    )
    return pub, published, clock, stored


def test_publisher_throttles_to_the_interval_after_each_publish() -> None:
    pub, published, clock, stored = publisher(0.5)
    latents = torch.randn(4, 8, 8)
    for step in range(1, 11):
        if pub.due():
            pub.offer(step, 10, latents)
        clock.now += 0.2
    # Published at t=0, 0.6, 1.2, 1.8 (a step every 0.2 s, 0.5 s apart at least).
    assert [p["step"] for p in published] == [1, 4, 7, 10]
    assert published[0] == {
        "uri": "file:///s/jobs/j/preview.jpg",
        "step": 1,
        "total": 10,
        "media_type": "image/jpeg",
    }
    assert Image.open(io.BytesIO(stored[0])).format == "JPEG"


def test_shipped_interval_is_500_ms() -> None:
    assert Settings().preview_interval_ms == 500
    assert Settings().previews is True and Settings().preview_decoder == ""
    pub, published, clock, _ = publisher(Settings().preview_interval_ms / 1000)
    for step in range(1, 21):
        if pub.due():
            pub.offer(step, 20, torch.randn(4, 8, 8))
        clock.now += 0.125  # exact in binary: the 0.5 s boundaries fall on steps
    assert [p["step"] for p in published] == [1, 5, 9, 13, 17]


def test_one_preview_in_flight_and_close_waits_for_it() -> None:
    started, release = threading.Event(), threading.Event()
    published: list[dict[str, Any]] = []

    def slow(data: bytes) -> dict[str, Any]:
        started.set()
        release.wait(5)
        return {"uri": "u"}

    with ThreadPoolExecutor(1) as pool:
        pub = PreviewPublisher(LinearDecoder(), pool, slow, published.append, 0.0)
        pub.offer(1, 3, torch.randn(4, 8, 8))
        assert started.wait(5)
        assert not pub.due()
        pub.offer(2, 3, torch.randn(4, 8, 8))  # busy: dropped, never queued
        threading.Timer(0.2, release.set).start()
        pub.close()
        assert [p["step"] for p in published] == [1]
        assert not pub.due()  # closed: a late step publishes nothing


def test_a_failed_store_skips_the_preview_not_the_job() -> None:
    def broken(data: bytes) -> dict[str, Any]:
        raise OSError("storage away")

    pub, published, _, _ = publisher(0.0, broken)
    pub.offer(1, 2, torch.randn(4, 8, 8))
    assert published == [] and pub.due()


# -- webhooks ------------------------------------------------------------------------


def test_preview_events_are_opt_in_with_an_id_per_attempt_and_step() -> None:
    assert "job.preview" in EVENTS
    assert "job.preview" not in WebhookSpec(url="https://x").events
    assert WebhookSpec(url="https://x", events=["job.preview"]).events == ["job.preview"]
    created = "2026-01-01T00:00:00Z"
    ids = {
        event_id("j", "job.preview", created, preview_key(attempt, {"preview": {"step": step}}))
        for attempt in (1, 2)
        for step in (3, 6)
    }
    assert len(ids) == 4
    assert event_id("j", "job.preview", created, "a1_3").endswith("_preview_a1_3")


# -- the predictor --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd(tiny_sd_model: Path) -> Iterator[DiffusionPredictor]:
    predictor = DiffusionPredictor(str(tiny_sd_model), settings=Settings())
    predictor.setup("cpu")
    yield predictor


def gen(**kw: Any) -> GenerateInput:
    fields: dict[str, Any] = {"prompt": "a cat", "width": 64, "height": 64, "steps": 3, "seed": 1}
    return GenerateInput(**{**fields, **kw})


def test_each_job_of_a_batched_call_previews_its_own_latents(sd: DiffusionPredictor) -> None:
    a, b, off = Sink(), Sink(), Sink()
    jobs = [
        GenerateJob(gen(seed=1, num_images=2), noop, a),
        GenerateJob(gen(seed=7), noop, None),
        GenerateJob(gen(seed=2), noop, b),
    ]
    sd.predict(jobs)
    total = a.offers[0][1]  # PNDM adds a warm-up step: 4 timesteps for steps=3
    every_step = [(step, total) for step in range(1, total + 1)]
    assert total >= 3
    assert [(s, t) for s, t, _ in a.offers] == every_step
    assert [(s, t) for s, t, _ in b.offers] == every_step
    assert off.offers == []
    assert a.offers[0][2].shape == (4, 8, 8) and a.offers[0][2].device.type == "cpu"
    # Job b alone draws the same noise: its previews are of its own latents, not a's.
    alone = Sink()
    sd.predict([GenerateJob(gen(seed=2), noop, alone)])
    for (_, _, batched), (_, _, lone) in zip(b.offers, alone.offers, strict=True):
        assert torch.allclose(batched, lone, atol=1e-3)
    assert not torch.allclose(a.offers[-1][2], b.offers[-1][2], atol=1e-2)
    # The early latents are far from the last ones (the preview shows the job forming).
    first, last = a.offers[0][2], a.offers[-1][2]
    assert (first - last).abs().mean() > 0.1


def test_inpaint_and_style_publish_previews(sd: DiffusionPredictor) -> None:
    image = Image.new("RGB", (64, 64), (90, 120, 30))
    mask = Image.new("L", (64, 64), 255)
    inpaint, style = Sink(), Sink()
    inp = InpaintInput(image=REF, mask=REF, prompt="a dog", steps=4, strength=1.0, seed=3)
    sd.run_inpaint(inp, image, mask, noop, inpaint)
    sd.run_style(
        StyleInput(image=REF, style_prompt="ink", steps=4, seed=3), image, None, noop, style
    )
    assert inpaint.offers and style.offers
    assert inpaint.offers[-1][2].shape == (4, 8, 8)


def test_previews_false_is_an_input_field() -> None:
    assert gen().previews is True
    assert gen(previews=False).previews is False
    assert InpaintInput(image=REF, mask=REF, prompt="p", previews=False).previews is False
