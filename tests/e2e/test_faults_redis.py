"""Redis restarted under a working fleet: nothing lost, everyone back within 30 s.

The module runs its own redis-server with AOF on (as production does), so restarting
it disturbs no other test.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from imageq.workers.testing.services import RedisServer, WebhookReceiver, wait_until
from tests.fixtures.services import Stack, service_env
from tests.helpers import ImageServer, image_server, png_bytes, png_uri

# Seconds to a minute each (worker restarts, outages): CI runs them too.
pytestmark = pytest.mark.slow

RECOVERY_S = 30.0
_n = itertools.count()


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-restart"), appendonly=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    with image_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def stack(
    own_redis: RedisServer,
    webhook_secret: str,
    tiny_caption_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("restart-stack")
    env = service_env(
        own_redis.url,
        f"file://{tmp / 'storage'}",
        webhook_secret,
        f"rr{next(_n)}-{os.getpid()}-",
        IMAGEQ_MODEL_CAPTION=str(tiny_caption_model),
        # A small pool (a few batches' worth of job threads), so that jobs queue up.
        IMAGEQ_MAX_BATCH_IMAGES="3",
    )
    found = Stack(env, tmp, own_redis)
    found.worker("webhooks", "webhooks@restart")
    found.worker("caption", "caption@restart")
    yield found
    found.close()


def _status(stack: Stack, job_id: str) -> str | None:
    try:
        record = stack.store.get(job_id)
    except redis.RedisError:
        return None
    return None if record is None else str(record.status)


def test_redis_restart_loses_nothing(
    stack: Stack,
    own_redis: RedisServer,
    images: ImageServer,
    receiver: WebhookReceiver,
    record_property: Callable[[str, object], None],
) -> None:
    # 12 slow jobs for fewer job threads: some running, the rest queued at the restart.
    jobs = []
    for i in range(12):
        path = f"/restart-{i}.png"
        images.files[path] = png_bytes((i * 20, 40, 90))
        images.slow[path] = 4.0
        jobs.append(
            stack.client.caption(image=images.url(path), webhook=receiver.url("/restart")).id
        )
    wait_until(lambda: sum(images.hits.values()) >= 2, 60, "jobs running")
    time.sleep(0.5)
    statuses = [_status(stack, j) for j in jobs]
    assert statuses.count("running") >= 2 and statuses.count("queued") >= 2, statuses
    record_property("running_at_restart", statuses.count("running"))
    record_property("queued_at_restart", statuses.count("queued"))

    own_redis.restart(down_s=2.0)
    back = time.monotonic()

    # The fleet is back: a new job submitted now runs within the recovery bound.
    probe = stack.client.caption(image=png_uri((1, 2, 3)))
    assert stack.client.wait(probe.id, RECOVERY_S).status == "succeeded"
    recovered_s = time.monotonic() - back
    record_property("restart_to_new_job_done_s", round(recovered_s, 1))
    assert recovered_s < RECOVERY_S
    for name in ("webhooks@restart", "caption@restart"):
        assert stack.redis.exists(stack.store.keys.worker(name))
    assert all(w.alive() for w in stack.workers)

    # Nothing lost: every job ran to success exactly once, with one final webhook.
    for job_id in jobs:
        record = stack.client.wait(job_id, 60)
        assert record.status == "succeeded", record.error
        assert record.attempt == 1, record
        assert stack.storage_path("jobs", job_id, "result.json").is_file()
    for i in range(12):
        assert images.hits[f"/restart-{i}.png"] == 1
    receiver.wait_for(lambda d: d.path == "/restart", count=12, timeout_s=60)
    time.sleep(2.0)
    for job_id in jobs:
        found = receiver.for_job(job_id)
        assert [d.json()["type"] for d in found] == ["job.succeeded"], found
    # Nothing stuck: no message left behind in the queue once the jobs are done.
    queue = stack.settings.queue_prefix + "caption"
    assert not any(stack.redis.llen(k) for k in stack.redis.scan_iter(queue + "*"))
