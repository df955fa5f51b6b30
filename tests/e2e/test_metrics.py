"""A live caption worker's Prometheus endpoint: the numbers move as jobs run."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from imageq.workers.testing.services import free_port, wait_until
from tests.fixtures.services import Stack
from tests.helpers import png_uri

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def stack(make_stack: Callable[..., Stack], tiny_caption_model: Path) -> Stack:
    s = make_stack(IMAGEQ_MODEL_CAPTION=str(tiny_caption_model))
    port = free_port()
    s.worker(
        "caption",
        "caption-metrics@test",
        IMAGEQ_METRICS_PORT=str(port),
        IMAGEQ_METRICS_ADDRESS="127.0.0.1",
    )
    s.extra["metrics_url"] = f"http://127.0.0.1:{port}/metrics"
    return s


def scrape(stack: Stack) -> Samples:
    text = requests.get(stack.extra["metrics_url"], timeout=10).text
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


def test_worker_identity_and_model_load(stack: Stack) -> None:
    samples = scrape(stack)
    info = value(
        samples,
        "imageq_worker_info",
        name="caption-metrics@test",
        kind="caption",
        device="cpu",
        model=stack.settings.model_caption,
    )
    assert info == 1.0
    assert value(samples, "imageq_model_load_seconds") > 0
    # A CPU worker has no GPU memory to report, and says nothing rather than zeros.
    assert not [key for key in samples if key[0] == "imageq_gpu_memory_bytes"]


def test_job_counters_and_histograms_move(stack: Stack) -> None:
    before = scrape(stack)
    ok_a = stack.client.caption(images=[png_uri((200, 0, 0)), png_uri((0, 200, 0))])
    ok_b = stack.client.caption(image=png_uri((0, 0, 200)))
    # Valid for the schema, undecodable for the worker: fails as invalid_input.
    bad = stack.client.caption(image="data:image/png;base64,bm90IGFuIGltYWdl")
    done_a = stack.client.wait(ok_a.id, 60)
    done_b = stack.client.wait(ok_b.id, 60)
    assert done_a.status == "succeeded" and done_b.status == "succeeded"
    assert stack.client.wait(bad.id, 60).status == "failed"
    # Each job's share of the model calls it was in (usage).
    model_s = done_a.metrics["model_s"] + done_b.metrics["model_s"]
    assert done_a.metrics["model_s"] > 0 and done_b.metrics["model_s"] > 0

    def delta(metric: str, /, **labels: str) -> float:
        return value(scrape(stack), metric, **labels) - value(before, metric, **labels)

    # The counters move in task_postrun, just after the final record is written.
    wait_until(
        lambda: delta("imageq_jobs_total", kind="caption", status="failed") == 1,
        10,
        "the failed job counted",
    )
    assert delta("imageq_jobs_total", kind="caption", status="succeeded") == 2
    assert delta("imageq_images_total", kind="caption") == 3
    assert delta("imageq_queue_wait_seconds_count", kind="caption") == 3
    assert delta("imageq_run_seconds_count", kind="caption") == 3
    assert delta("imageq_run_seconds_sum", kind="caption") > 0
    assert delta("imageq_batch_size_count", kind="caption") == 2
    assert delta("imageq_batch_size_sum", kind="caption") >= 3
    # Jobs submitted without a gateway tenant count under "-"; the failed one never
    # reached the model.
    charged = delta("imageq_tenant_model_seconds_total", tenant="-", kind="caption")
    assert charged == pytest.approx(model_s, abs=1e-5)


def test_queue_depth_counts_every_priority(stack: Stack) -> None:
    prefix = stack.settings.queue_prefix
    samples = scrape(stack)
    assert value(samples, "imageq_queue_depth", queue=prefix + "caption") == 0
    assert value(samples, "imageq_queue_depth", queue=prefix + "match") == 0
    # No match worker runs here: the jobs wait, spread over kombu's priority sub-lists.
    for priority in (0, 5, 9):
        stack.client.submit(
            "match", {"image": png_uri(), "texts": ["a red square"]}, priority=priority
        )
    samples = scrape(stack)
    assert value(samples, "imageq_queue_depth", queue=prefix + "match") == 3
    assert value(samples, "imageq_queue_backlog", queue=prefix + "match") == 3
    assert value(samples, "imageq_queue_depth", queue=prefix + "generate") == 0
    queues = {dict(labels)["queue"] for name, labels in samples if name == "imageq_queue_depth"}
    assert {prefix + q for q in ("caption", "match", "generate", "finetune", "webhooks")} <= queues
    backlogs = {dict(labels)["queue"] for name, labels in samples if name == "imageq_queue_backlog"}
    assert backlogs == queues


def test_backlog_adds_messages_reserved_but_not_started(stack: Stack) -> None:
    """A job message held for its countdown has left the queue list (depth 0) but no
    worker started it: the backlog an autoscaler should see still counts it."""
    from celery import Celery

    from imageq.api_client.celery_config import celery_config

    queue = stack.settings.queue_prefix + "caption"
    app = Celery("raw-producer", set_as_current=False)
    app.conf.update(celery_config(stack.settings))
    doc = {"id": str(uuid.uuid4()), "kind": "caption", "input": {"image": png_uri()}}
    app.send_task("imageq.caption", args=[doc], task_id=doc["id"], queue=queue, countdown=4)
    app.close()
    wait_until(
        lambda: value(scrape(stack), "imageq_queue_backlog", queue=queue) == 1,
        10,
        "the reserved message in the backlog",
        every_s=0.2,
    )
    assert value(scrape(stack), "imageq_queue_depth", queue=queue) == 0
    # Once its countdown is over it runs (a raw message: its record appears then), and
    # the backlog is empty again.
    wait_until(lambda: stack.store.get(doc["id"]) is not None, 20, "the job to start")
    assert stack.client.wait(doc["id"], 60).status == "succeeded"
    wait_until(
        lambda: value(scrape(stack), "imageq_queue_backlog", queue=queue) == 0,
        10,
        "an empty backlog",
        every_s=0.2,
    )


def test_gpu_memory_and_a_redis_that_is_away(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here: torch.cuda's counters are stubbed to check what a CUDA worker exports,
    against a broker nobody listens on (the scrape still answers)."""
    import torch
    from prometheus_client import generate_latest

    from imageq.api_client.settings import Settings
    from imageq.workers.ops.metrics import Metrics, WorkerView

    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 * gib)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda device=None: SimpleNamespace(total_memory=80 * gib),
    )
    settings = Settings.from_env(
        {
            "IMAGEQ_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
            "IMAGEQ_WORKER_KIND": "diffusion",
        }
    )
    view = WorkerView(
        name="diffusion-gpu1@host",
        kind="diffusion",
        device="cuda:1",
        model="sd15",
        model_load_s=12.5,
    )
    metrics = Metrics(settings, view)
    samples: Samples = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert value(samples, "imageq_gpu_memory_bytes", device="cuda:1", state="allocated") == 3 * gib
    assert value(samples, "imageq_gpu_memory_bytes", device="cuda:1", state="reserved") == 5 * gib
    assert value(samples, "imageq_gpu_memory_bytes", device="cuda:1", state="total") == 80 * gib
    assert value(samples, "imageq_model_load_seconds") == 12.5
    assert not [key for key in samples if key[0] in ("imageq_queue_depth", "imageq_queue_backlog")]
