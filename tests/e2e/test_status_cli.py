"""The real ``imageq status`` command against a live stack."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imageq.workers.testing.services import free_port, wait_until
from tests.fixtures.services import Stack
from tests.helpers import ImageServer, image_server, png_bytes, png_uri

WORKER = "caption-status@test"


def imageq_command() -> list[str]:
    """The installed console script where there is one, else the same entry point."""
    script = Path(sys.executable).parent / "imageq"
    return [str(script)] if script.exists() else [sys.executable, "-m", "imageq.api_client.cli"]


def run_status(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*imageq_command(), "status"], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    with image_server() as srv:
        srv.files["/slow.png"] = png_bytes((90, 90, 20), (64, 64))
        srv.slow["/slow.png"] = 8.0
        yield srv


@pytest.fixture(scope="module")
def stack(make_stack: Callable[..., Stack], tiny_caption_model: Path) -> Stack:
    s = make_stack(IMAGEQ_MODEL_CAPTION=str(tiny_caption_model))
    s.worker("caption", WORKER)
    return s


def section(output: str, title: str) -> list[str]:
    """The lines under a heading, up to the blank line that ends it."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    out = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        out.append(line)
    return out


def row(lines: list[str], first: str) -> list[str]:
    return next(line.split() for line in lines if line.split()[:1] == [first])


def test_status_shows_queues_workers_current_job_and_throughput(
    stack: Stack, images: ImageServer
) -> None:
    prefix = stack.settings.queue_prefix
    done = [stack.client.caption(image=png_uri((i * 40, 10, 10))) for i in range(3)]
    for job in done:
        assert stack.client.wait(job.id, 60).status == "succeeded"
    # Nothing serves match here: these wait in the queue.
    for _ in range(2):
        stack.client.submit("match", {"image": png_uri(), "texts": ["a cat"]})
    slow = stack.client.caption(image=images.url("/slow.png"))

    def busy() -> bool:
        raw = stack.redis.get(stack.store.keys.worker(WORKER))
        return bool(raw) and slow.id in (json.loads(raw).get("current") or {})

    wait_until(busy, 15, "the worker to report its current job", every_s=0.2)
    result = run_status(stack.env)
    assert result.returncode == 0, result.stderr
    out = result.stdout

    queues = section(out, "QUEUES")
    assert queues[0].split() == ["queue", "depth", "reserved", "backlog", "workers"]
    assert row(queues, prefix + "match")[1:] == ["2", "0", "2", "0"]
    assert row(queues, prefix + "caption")[1:] == ["0", "0", "0", "1"]
    assert row(queues, prefix + "generate")[1] == "0"

    workers = section(out, "WORKERS (1 live)")
    line = next(line for line in workers if line.startswith(WORKER))
    cells = line.split()
    assert cells[1:3] == ["caption", "cpu"]
    assert f"caption {slow.id}" in line
    assert cells[-3] == "3"  # done: every finished job, the last one included

    throughput = section(out, "THROUGHPUT")
    assert throughput[0].split()[:6] == [
        "kind",
        "queued",
        "running",
        "succeeded",
        "failed",
        "canceled",
    ]
    caption = row(throughput, "caption")
    assert caption[3] == "3" and caption[2] == "1"  # 3 succeeded, the slow one running
    assert float(caption[6]) > 0  # done/min over the window
    assert row(throughput, "match")[1] == "2"

    assert stack.client.wait(slow.id, 60).status == "succeeded"


def test_backlog_counts_messages_reserved_but_not_started(stack: Stack) -> None:
    """A message the worker took but holds for its countdown is no longer in the queue
    list, yet no worker has started it: backlog, not depth."""
    from celery import Celery

    from imageq.api_client.celery_config import celery_config

    prefix = stack.settings.queue_prefix
    app = Celery("raw-producer", set_as_current=False)
    app.conf.update(celery_config(stack.settings))
    doc = {"id": str(uuid.uuid4()), "kind": "caption", "input": {"image": png_uri()}}
    app.send_task(
        "imageq.caption", args=[doc], task_id=doc["id"], queue=prefix + "caption", countdown=25
    )

    def reserved() -> bool:
        raw = stack.redis.get(stack.store.keys.worker(WORKER))
        return bool(raw) and (json.loads(raw).get("reserved") or {}).get(prefix + "caption") == 1

    wait_until(reserved, 15, "the worker to report the reserved message", every_s=0.2)
    result = run_status(stack.env)
    assert result.returncode == 0, result.stderr
    assert row(section(result.stdout, "QUEUES"), prefix + "caption")[1:] == ["0", "1", "1", "1"]
    app.close()


def test_status_without_redis_is_a_clear_error(stack: Stack) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    result = run_status({**stack.env, "IMAGEQ_BROKER_URL": nowhere})
    assert result.returncode == 2
    assert "cannot read status from Redis" in result.stderr
    assert "Traceback" not in result.stderr


def test_container_healthcheck_reads_the_same_registry(stack: Stack) -> None:
    """docker/healthcheck.py: healthy while a worker on this host beats, not otherwise."""
    script = Path(__file__).resolve().parents[2] / "docker" / "healthcheck.py"
    root = str(script.parents[1])

    def check(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script)],
            env={**stack.env, "PYTHONPATH": root, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    healthy = check()
    assert healthy.returncode == 0 and healthy.stdout.strip() == "healthy", healthy.stdout
    alone = check(IMAGEQ_QUEUE_PREFIX="nobody-here-")
    assert alone.returncode == 1 and "no live worker heartbeat" in alone.stdout
    # A metrics port nobody listens on: the worker's endpoint is part of its health.
    dark = check(IMAGEQ_METRICS_PORT=str(free_port()))
    assert dark.returncode == 1 and "metrics endpoint" in dark.stdout
