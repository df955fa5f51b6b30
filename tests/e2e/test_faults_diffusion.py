"""A diffusion worker SIGKILLed mid-denoising: the job is redelivered and succeeds once.

Its own Redis database with a 3 s visibility timeout, so the redelivery comes quickly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from imageq.workers.testing.services import RedisServer, WebhookReceiver, wait_until
from tests.fixtures.services import Stack

# Seconds to a minute each (worker restarts, outages): CI runs them too.
pytestmark = pytest.mark.slow

# 256 px at tens of milliseconds a step: seconds of denoising to land a kill in.
SLOW = {"width": 256, "height": 256, "steps": 60, "seed": 42}


def test_sigkill_mid_denoising_redelivers_and_succeeds_once(
    make_stack: Callable[..., Stack],
    redis_server: RedisServer,
    tiny_sd_model: Path,
    receiver: WebhookReceiver,
    record_property: Callable[[str, object], None],
) -> None:
    stack = make_stack(
        IMAGEQ_BROKER_URL=redis_server.url.rsplit("/", 1)[0] + "/2",
        IMAGEQ_MODEL_DIFFUSION=str(tiny_sd_model),
        IMAGEQ_VISIBILITY_TIMEOUT_S="3",
    )
    stack.worker("webhooks", "webhooks@sd-kill")
    first = stack.worker("diffusion", "sd-1@kill")
    job = stack.client.generate("a lighthouse", webhook=receiver.url("/sd-kill"), **SLOW)

    def denoising() -> bool:
        record = stack.client.get(job.id)
        assert record.status in ("queued", "running"), record
        progress = record.progress or {}
        return progress.get("stage") == "denoising" and int(progress.get("step", 0)) >= 3

    wait_until(denoising, 60, "the job denoising", every_s=0.02)
    first.kill()
    killed = time.monotonic()
    killed_at = stack.client.get(job.id)
    assert killed_at.status == "running" and killed_at.attempt == 1
    assert killed_at.progress is not None
    assert killed_at.progress["step"] < killed_at.progress["total"]

    second = stack.worker("diffusion", "sd-2@kill")
    record = stack.client.wait(job.id, 120)
    assert record.status == "succeeded", record.error
    assert record.attempt == 2 and record.worker == second.name
    record_property("kill_to_succeeded_s", round(time.monotonic() - killed, 1))
    record_property("killed_at_step", killed_at.progress["step"])
    # The second run denoised from the start to the end (PNDM counts one step extra).
    assert record.progress is not None and record.progress["stage"] == "denoising"
    assert record.progress["step"] == record.progress["total"] >= SLOW["steps"]
    assert record.output is not None and len(record.output["images"]) == 1
    files = sorted(p.name for p in stack.storage_path("jobs", job.id).iterdir())
    assert files == ["image-0.png", "preview.jpg", "result.json"]
    receiver.wait_for(lambda d: d.path == "/sd-kill")
    time.sleep(1.5)
    deliveries = receiver.for_job(job.id)
    assert [d.json()["type"] for d in deliveries] == ["job.succeeded"]
    assert deliveries[0].json()["data"]["attempt"] == 2
    assert second.alive()
