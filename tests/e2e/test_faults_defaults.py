"""Fault recovery with the clocks a deployment ships with.

No clock is shortened here: visibility timeout 3600 s (finetune 7 days), lease TTL 30 s,
heartbeat 5 s, failover scan 5 s, lease wait 10 s, the default webhook schedule. A job
whose worker dies must run again on a live worker of its kind within
``lease_ttl_s + 15`` seconds (the lease failover, not the broker's redelivery an hour
later), then succeed exactly once: one set of outputs, one final webhook, the attempt
count saying how many runs it took.

Each test starts the two workers it needs, both idle, submits one job and faults the
worker that took it: the other one is the live worker of that kind. The recovery times
are recorded as test properties (docs/reliability.md, "with the defaults").
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imageq.api_client.schemas import JobRecord
from imageq.api_client.settings import Settings
from imageq.workers.testing.services import RedisServer, WebhookReceiver, WorkerProcess, wait_until
from tests.fixtures.services import Stack, service_env
from tests.helpers import ImageServer, image_server, png_bytes

# Each case waits out a 30 s lease: minutes in all. CI runs them too.
pytestmark = pytest.mark.slow

DEFAULTS = Settings.from_env({})
TARGET_S = DEFAULTS.lease_ttl_s + 15
# What a deployment must set (where things are); every other setting, every clock among
# them, keeps its default.
DEPLOYMENT = {
    "IMAGEQ_BROKER_URL",
    "IMAGEQ_FINETUNE_BROKER_URL",
    "IMAGEQ_STORAGE_URL",
    "IMAGEQ_WEBHOOK_SECRET",
    "IMAGEQ_QUEUE_PREFIX",
    "IMAGEQ_MODEL_CAPTION",
    "IMAGEQ_MODEL_DIFFUSION",
    # The tests' image host and webhook receiver listen on loopback.
    "IMAGEQ_ALLOW_PRIVATE_URLS",
}
# One batch of 24 images with long beam searches: seconds on the tiny BLIP.
SLOW_CAPTION = {"max_new_tokens": 256, "min_new_tokens": 256, "num_beams": 10}
IMAGES = 24
KILL_AFTER_S = 1.0
SLOW_GENERATE = {"width": 256, "height": 256, "steps": 150, "seed": 7}
FINETUNE: dict[str, Any] = {
    "target": "diffusion",
    "resolution": 64,
    "max_steps": 400,
    "checkpoint_every": 25,
    "batch_size": 2,
    "learning_rate": 1e-3,
}
# A test-only fault point: on the worker given this folder on its PYTHONPATH, the
# process dies at the named moment (os._exit, as abrupt as a SIGKILL).
SITECUSTOMIZE = """
import os

_AT = os.environ.get("FAULT_CRASH_AT", "")
if _AT:
    from imageq.workers.runtime import jobstate

    _claim_once = jobstate.JobState.claim_once

    def claim_once(self, job_id, what):
        # "result.json" is claimed right after the final record is stored, before the
        # final event is sent; "webhook:..." right after the final event was sent.
        if (_AT == "after_final_record" and what == "result.json") or (
            _AT == "after_final_event" and what.startswith("webhook:job.")
        ):
            print(f"FAULT: {_AT} of job {job_id}: exiting", flush=True)
            os._exit(70)
        return _claim_once(self, job_id, what)

    jobstate.JobState.claim_once = claim_once
"""


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    with image_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def stack(
    redis_server: RedisServer,
    webhook_secret: str,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_caption_model: Path,
    tiny_sd_model: Path,
) -> Iterator[Stack]:
    """A deployment on its own Redis databases, every clock at its default."""
    tmp = tmp_path_factory.mktemp("defaults")
    base = redis_server.url.rsplit("/", 1)[0]
    env = service_env(
        f"{base}/5",
        f"file://{tmp / 'storage'}",
        webhook_secret,
        f"defaults-{os.getpid()}-",
        IMAGEQ_FINETUNE_BROKER_URL=f"{base}/6",
        IMAGEQ_MODEL_CAPTION=str(tiny_caption_model),
        IMAGEQ_MODEL_DIFFUSION=str(tiny_sd_model),
    )
    for name in [n for n in env if n.startswith("IMAGEQ_") and n not in DEPLOYMENT]:
        del env[name]
    deployment = Stack(env, tmp, redis_server)
    settings = deployment.settings
    for clock in (
        "visibility_timeout_s",
        "finetune_visibility_timeout_s",
        "lease_ttl_s",
        "heartbeat_interval_s",
        "failover_scan_s",
        "lease_wait_s",
        "webhook_schedule_s",
        "max_attempts",
        "max_batch_images",
    ):
        assert getattr(settings, clock) == getattr(DEFAULTS, clock), clock
    deployment.worker("webhooks", "webhooks@defaults")
    yield deployment
    deployment.close()


@pytest.fixture
def two_workers(stack: Stack) -> Iterator[Callable[..., list[WorkerProcess]]]:
    """Starts a test's two workers of one kind; stops them when the test ends."""
    started: list[WorkerProcess] = []

    def start(kind: str, name: str) -> list[WorkerProcess]:
        started.extend(_two_workers(stack, kind, name))
        return started[-2:]

    yield start
    stop(*started)


def _two_workers(stack: Stack, kind: str, name: str, **env: str) -> list[WorkerProcess]:
    workers = [stack.worker(kind, f"{name}-{i}@defaults", ready=False, **env) for i in range(2)]
    for worker in workers:
        worker.wait_ready(stack.redis, stack.store.keys.worker(worker.name))
    return workers


def owner_of(
    workers: list[WorkerProcess], record: JobRecord
) -> tuple[WorkerProcess, WorkerProcess]:
    """(the worker running the job, the other one)."""
    (victim,) = [w for w in workers if w.name == record.worker]
    (other,) = [w for w in workers if w is not victim]
    return victim, other


def running_again(stack: Stack, job_id: str, attempt: int, since: float) -> float:
    """Seconds from ``since`` until the job is running as ``attempt`` (or beyond)."""

    def back() -> bool:
        record = stack.client.get(job_id)
        return record.is_final or (record.status == "running" and record.attempt >= attempt)

    wait_until(back, TARGET_S + 60, f"job {job_id} running again", every_s=0.1)
    return time.monotonic() - since


def one_final_webhook(receiver: WebhookReceiver, job_id: str, event: str) -> dict[str, Any]:
    receiver.wait_for(lambda d: d.json()["data"]["id"] == job_id, timeout_s=TARGET_S + 30)
    time.sleep(2.0)  # a duplicate would follow within moments
    found = [d for d in receiver.for_job(job_id) if d.json()["type"] == event]
    assert len(receiver.for_job(job_id)) == len(found) == 1, [
        d.json()["type"] for d in receiver.for_job(job_id)
    ]
    body: dict[str, Any] = found[0].json()
    return body


def outputs(stack: Stack, job_id: str) -> set[str]:
    folder = stack.storage_path("jobs", job_id)
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def result_json(stack: Stack, job_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(stack.storage_path("jobs", job_id, "result.json").read_text())
    return data


def stop(*workers: WorkerProcess) -> None:
    for worker in workers:
        if worker.process is not None and worker.process.poll() is None:
            os.kill(worker.pid, signal.SIGCONT)  # a frozen one cannot hear SIGTERM
        worker.stop()


def test_sigkill_mid_batch_caption(
    two_workers: Callable[..., list[WorkerProcess]],
    stack: Stack,
    images: ImageServer,
    receiver: WebhookReceiver,
    record_property: Callable[[str, object], None],
) -> None:
    workers = two_workers("caption", "caption-kill")
    for i in range(IMAGES):
        images.files[f"/kill/{i}.png"] = png_bytes((10 * i, 40, 200))
    job = stack.client.caption(
        images=[images.url(f"/kill/{i}.png") for i in range(IMAGES)],
        generation=SLOW_CAPTION,
        webhook=receiver.url("/defaults-caption"),
    )
    # All fetched: the batcher runs them as one forward pass.
    wait_until(
        lambda: sum(images.hits.get(f"/kill/{i}.png", 0) for i in range(IMAGES)) == IMAGES,
        60,
        "fetch",
    )
    time.sleep(KILL_AFTER_S)
    record = stack.client.get(job.id)
    assert record.status == "running" and record.attempt == 1, record
    victim, live = owner_of(workers, record)
    victim.kill()
    killed = time.monotonic()
    back_s = running_again(stack, job.id, 2, killed)
    done = stack.client.wait(job.id, 300)
    done_s = time.monotonic() - killed
    record_property("kill_to_running_again_s", round(back_s, 1))
    record_property("kill_to_succeeded_s", round(done_s, 1))
    assert back_s <= TARGET_S, back_s
    assert done.status == "succeeded", done.error
    assert done.attempt == 2 and done.worker == live.name
    # One forward pass for all the images (the default batch holds 32), long enough that
    # the kill landed inside the first one.
    assert done.metrics["batch_size"] == IMAGES and done.output is not None
    assert done.metrics["run_s"] > KILL_AFTER_S
    assert len(done.output["captions"]) == IMAGES
    assert outputs(stack, job.id) == {"result.json"}
    assert result_json(stack, job.id)["attempt"] == 2
    # Fetched by the killed run and by the one that succeeded: no third run.
    assert all(images.hits[f"/kill/{i}.png"] == 2 for i in range(IMAGES))
    assert one_final_webhook(receiver, job.id, "job.succeeded")["data"]["attempt"] == 2
    assert "lapsed during attempt 1" in "".join(
        w.log_path.read_text(errors="replace") for w in stack.workers
    )


def _denoising(stack: Stack, job_id: str, at_least: int) -> Callable[[], bool]:
    def check() -> bool:
        record = stack.client.get(job_id)
        progress = record.progress or {}
        return progress.get("stage") == "denoising" and int(progress.get("step", 0)) >= at_least

    return check


def test_sigkill_mid_denoise_generate(
    two_workers: Callable[..., list[WorkerProcess]],
    stack: Stack,
    receiver: WebhookReceiver,
    record_property: Callable[[str, object], None],
) -> None:
    workers = two_workers("diffusion", "sd-kill")
    job = stack.client.generate(
        "a lighthouse", webhook=receiver.url("/defaults-sd"), **SLOW_GENERATE
    )
    wait_until(_denoising(stack, job.id, 3), 120, "the job denoising", every_s=0.05)
    killed_at = stack.client.get(job.id)
    victim, live = owner_of(workers, killed_at)
    victim.kill()
    killed = time.monotonic()
    assert killed_at.progress is not None
    assert killed_at.progress["step"] < killed_at.progress["total"]
    back_s = running_again(stack, job.id, 2, killed)
    done = stack.client.wait(job.id, 300)
    record_property("killed_at_step", killed_at.progress["step"])
    record_property("kill_to_running_again_s", round(back_s, 1))
    record_property("kill_to_succeeded_s", round(time.monotonic() - killed, 1))
    assert back_s <= TARGET_S, back_s
    assert done.status == "succeeded", done.error
    assert done.attempt == 2 and done.worker == live.name
    assert done.progress is not None and done.progress["step"] == done.progress["total"]
    # preview.jpg: the latest step preview (on by default), overwritten by each run.
    assert outputs(stack, job.id) == {"image-0.png", "preview.jpg", "result.json"}
    assert one_final_webhook(receiver, job.id, "job.succeeded")["data"]["attempt"] == 2


def test_sigstop_past_the_lease_then_sigcont_never_finishes_twice(
    two_workers: Callable[..., list[WorkerProcess]],
    stack: Stack,
    receiver: WebhookReceiver,
    record_property: Callable[[str, object], None],
) -> None:
    workers = two_workers("diffusion", "sd-stop")
    job = stack.client.generate(
        "a harbour", webhook=receiver.url("/defaults-stop"), **SLOW_GENERATE
    )
    wait_until(_denoising(stack, job.id, 3), 120, "the job denoising", every_s=0.05)
    frozen, live = owner_of(workers, stack.client.get(job.id))
    os.kill(frozen.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    back_s = running_again(stack, job.id, 2, stopped)
    # Thawed while the new run denoises: the frozen run must notice and stand down.
    wait_until(_denoising(stack, job.id, 3), 120, "attempt 2 denoising", every_s=0.05)
    assert stack.client.get(job.id).worker == live.name
    os.kill(frozen.pid, signal.SIGCONT)
    done = stack.client.wait(job.id, 300)
    record_property("stop_to_running_again_s", round(back_s, 1))
    assert back_s <= TARGET_S, back_s
    assert done.status == "succeeded", done.error
    assert done.attempt == 2 and done.worker == live.name
    # preview.jpg: the latest step preview (on by default), overwritten by each run.
    assert outputs(stack, job.id) == {"image-0.png", "preview.jpg", "result.json"}
    assert result_json(stack, job.id)["worker"] == live.name
    assert one_final_webhook(receiver, job.id, "job.succeeded")["data"]["attempt"] == 2
    log = frozen.log_path.read_text(errors="replace")
    assert "lease lost" in log and f"job {job.id}: attempt 1 abandoned" in log, log[-3000:]
    assert frozen.alive()


def make_dataset(stack: Stack, name: str) -> str:
    buf = io.BytesIO()
    colors = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (220, 220, 30)]
    with zipfile.ZipFile(buf, "w") as archive:
        lines = []
        for i, color in enumerate(colors):
            image = io.BytesIO()
            Image.new("RGB", (72, 64), color).save(image, format="PNG")
            archive.writestr(f"{i}.png", image.getvalue())
            lines.append(json.dumps({"file_name": f"{i}.png", "text": f"colour number {i}"}))
        archive.writestr("metadata.jsonl", "\n".join(lines))
    path = stack.storage_path("datasets", name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path.as_uri()


def training_step(stack: Stack, job_id: str) -> int:
    progress = stack.client.get(job_id).progress or {}
    return int(progress.get("step", 0)) if progress.get("stage") == "training" else 0


def checkpoints(stack: Stack, job_id: str) -> list[int]:
    folder = stack.storage_path("jobs", job_id, "checkpoints")
    return sorted(int(p.parent.name.split("-")[1]) for p in folder.glob("*/manifest.json"))


def finetune_outputs_ok(stack: Stack, job_id: str, name: str) -> None:
    files = outputs(stack, job_id)
    assert "result.json" in files
    assert {f for f in files if not f.startswith("checkpoints/")} == {"result.json"}
    (entry,) = [e for e in stack.client.adapters() if e["name"] == name]
    assert entry["job_id"] == job_id


def test_sigkill_mid_training_resumes_from_the_last_checkpoint(
    two_workers: Callable[..., list[WorkerProcess]],
    stack: Stack,
    receiver: WebhookReceiver,
    record_property: Callable[[str, object], None],
) -> None:
    workers = two_workers("finetune", "ft-kill")
    job = stack.client.finetune(
        dataset=make_dataset(stack, "kill.zip"),
        name="defaults-kill",
        webhook=receiver.url("/defaults-ft-kill"),
        **FINETUNE,
    )
    wait_until(lambda: training_step(stack, job.id) >= 60, 180, "training past step 60")
    victim, live = owner_of(workers, stack.client.get(job.id))
    victim.kill()
    killed = time.monotonic()
    saved = checkpoints(stack, job.id)
    assert saved and saved[-1] >= 50
    back_s = running_again(stack, job.id, 2, killed)
    done = stack.client.wait(job.id, 600)
    record_property("kill_to_running_again_s", round(back_s, 1))
    record_property("kill_to_succeeded_s", round(time.monotonic() - killed, 1))
    assert back_s <= TARGET_S, back_s
    assert done.status == "succeeded", done.error
    assert done.attempt == 2 and done.worker == live.name and done.output is not None
    assert done.output["resumed_from_step"] == saved[-1]
    assert done.metrics["steps_run"] == FINETUNE["max_steps"] - saved[-1]
    finetune_outputs_ok(stack, job.id, "defaults-kill")
    assert one_final_webhook(receiver, job.id, "job.succeeded")["data"]["attempt"] == 2


def test_sigterm_of_a_finetune_worker_hands_the_job_back(
    two_workers: Callable[..., list[WorkerProcess]],
    stack: Stack,
    receiver: WebhookReceiver,
    record_property: Callable[[str, object], None],
) -> None:
    workers = two_workers("finetune", "ft-term")
    job = stack.client.finetune(
        dataset=make_dataset(stack, "term.zip"),
        name="defaults-term",
        webhook=receiver.url("/defaults-ft-term"),
        **FINETUNE,
    )
    wait_until(lambda: training_step(stack, job.id) >= 60, 180, "training past step 60")
    leaving, live = owner_of(workers, stack.client.get(job.id))
    assert leaving.process is not None
    leaving.process.send_signal(signal.SIGTERM)  # a deploy, docker compose down
    termed = time.monotonic()
    assert leaving.process.wait(120) == 0
    exit_s = time.monotonic() - termed
    log = leaving.log_path.read_text(errors="replace")
    found = re.search(rf"job {job.id}: handed back: .*checkpoint saved at step (\d+)", log)
    assert found is not None, log[-3000:]
    handed_back_at = int(found.group(1))
    assert handed_back_at in checkpoints(stack, job.id)

    def resumed() -> bool:
        record = stack.client.get(job.id)
        return record.is_final or (record.status == "running" and record.worker == live.name)

    wait_until(resumed, 120, "the job running on the other worker", every_s=0.1)
    back_s = time.monotonic() - termed
    done = stack.client.wait(job.id, 600)
    record_property("sigterm_to_exit_s", round(exit_s, 1))
    record_property("sigterm_to_running_again_s", round(back_s, 1))
    record_property("handed_back_at_step", handed_back_at)
    assert back_s <= 60, back_s
    assert done.status == "succeeded", done.error
    # A hand-back is not a lost worker (requeued, not counted against max_attempts), but
    # the run that finished is a new attempt, with events of its own.
    assert done.attempt == 2 and done.metrics["requeued"] == 1
    assert done.worker == live.name and done.output is not None
    # Checkpointed where it stopped (off the every-25 grid as often as not), resumed there.
    assert done.output["resumed_from_step"] == handed_back_at >= 60
    assert done.metrics["steps_run"] == FINETUNE["max_steps"] - handed_back_at
    finetune_outputs_ok(stack, job.id, "defaults-term")
    assert one_final_webhook(receiver, job.id, "job.succeeded")["data"]["attempt"] == 2


@pytest.mark.parametrize("crash_at", ["after_final_record", "after_final_event"])
def test_a_crash_while_ending_still_sends_one_final_webhook(
    crash_at: str,
    stack: Stack,
    images: ImageServer,
    receiver: WebhookReceiver,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    webhooks = next(w for w in stack.workers if w.kind == "webhooks")

    def duplicates() -> int:
        return webhooks.log_path.read_text(errors="replace").count(": 'duplicate'")

    dropped_before = duplicates()
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(tmp_path), stack.env.get("PYTHONPATH", "")) if p)
    victim = stack.worker(
        "caption", f"caption-crash-{crash_at}@defaults", FAULT_CRASH_AT=crash_at, PYTHONPATH=path
    )
    images.files[f"/{crash_at}.png"] = png_bytes((90, 90, 20))
    job = stack.client.caption(
        image=images.url(f"/{crash_at}.png"), webhook=receiver.url(f"/defaults-{crash_at}")
    )
    assert victim.process is not None
    try:
        assert victim.process.wait(120) == 70
    finally:
        victim.stop()  # if it never reached the fault point
    crashed = time.monotonic()
    assert f"FAULT: {crash_at} of job {job.id}" in victim.log_path.read_text(errors="replace")
    record = stack.client.get(job.id)
    assert record.status == "succeeded" and record.attempt == 1
    if crash_at == "after_final_record":
        assert receiver.for_job(job.id) == []  # the event was never sent by the victim
    # A sweeper completes the job's side effects once the dead worker's lease lapses.
    running = stack.store.keys.running()
    wait_until(lambda: stack.redis.zscore(running, job.id) is None, TARGET_S + 30, "finalize")
    finalized_s = time.monotonic() - crashed
    record_property("crash_to_finalized_s", round(finalized_s, 1))
    assert finalized_s <= TARGET_S, finalized_s
    logs = "".join(w.log_path.read_text(errors="replace") for w in stack.workers)
    assert f"job {job.id}: succeeded, but worker {victim.name} died" in logs
    receiver.wait_for(lambda d: d.json()["data"]["id"] == job.id, timeout_s=30)
    if crash_at == "after_final_record":
        record_property("crash_to_final_webhook_s", round(time.monotonic() - crashed, 1))
    # The webhook-id sent twice (victim, then sweeper) when the victim died after sending:
    # the webhooks worker delivers it once.
    body = one_final_webhook(receiver, job.id, "job.succeeded")
    assert body["data"]["attempt"] == 1
    if crash_at == "after_final_event":
        # Not vacuous: the sweeper did send the event again, and it was dropped.
        assert duplicates() == dropped_before + 1
    assert outputs(stack, job.id) == {"result.json"}
    assert result_json(stack, job.id)["status"] == "succeeded"
    assert images.hits[f"/{crash_at}.png"] == 1
