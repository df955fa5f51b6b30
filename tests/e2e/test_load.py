"""A short sustained load (bench/load.py's check): 300 mixed jobs from 3 producer
processes against a caption worker, a match worker and the webhooks worker. Every id
ends with exactly one final record and one final webhook; nothing is left queued,
running or unacknowledged; the workers live on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.load import await_final, check, produce, settle_webhooks
from imageq.workers.testing.services import WebhookReceiver
from tests.fixtures.services import Stack

PRODUCERS = 3
PER_PRODUCER = 100


@pytest.mark.slow
def test_sustained_load_loses_and_duplicates_nothing(
    make_stack: Callable[..., Stack],
    tiny_caption_model: Path,
    tiny_match_model: Path,
    receiver: WebhookReceiver,
    record_property: Callable[[str, object], None],
) -> None:
    stack = make_stack(
        IMAGEQ_MODEL_CAPTION=str(tiny_caption_model),
        IMAGEQ_MODEL_MATCH=str(tiny_match_model),
        IMAGEQ_MAX_BATCH_WAIT_MS="10",
    )
    started = [
        stack.worker(kind, f"{kind}@load", ready=False) for kind in ("webhooks", "caption", "match")
    ]
    for worker in started:
        worker.wait_ready(stack.redis, stack.store.keys.worker(worker.name))

    began = time.monotonic()
    submitted = produce(stack.settings, PRODUCERS, PER_PRODUCER, 0.0, receiver.url("/load"))
    assert len(submitted) == PRODUCERS * PER_PRODUCER
    records = await_final(stack.store, [s.id for s in submitted], timeout_s=120)
    deliveries = settle_webhooks(receiver, "/load", len(submitted), timeout_s=60)
    report = check(stack.store, submitted, records, deliveries, stack.settings.queue_prefix)
    wall_s = time.monotonic() - began

    for name, value in (
        ("jobs_per_s", round(report.jobs_per_s, 1)),
        ("p50_ms", round(report.p50_s * 1000)),
        ("p99_ms", round(report.p99_s * 1000)),
        ("wall_s", round(wall_s, 1)),
    ):
        record_property(name, value)
    print("\n".join(report.lines()))
    assert report.problems == []
    assert report.statuses == {"succeeded": len(submitted)}
    assert {s.kind for s in submitted} == {"caption", "match"}
    assert all(worker.alive() for worker in started)
