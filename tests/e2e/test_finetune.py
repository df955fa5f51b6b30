"""Finetune jobs through real worker processes: train, publish, serve, resume, stop.

One deployment: a caption worker (which must pick up a freshly published adapter without
a restart), the webhooks worker, and a finetune worker on its own Redis database with a
short visibility timeout, so a SIGKILLed worker's job comes back within seconds.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from PIL import Image

from imageq.api_client.schemas import JobRecord
from imageq.api_client.settings import Settings
from imageq.workers.io.storage import S3Storage
from imageq.workers.runtime.control import LeaseKeeper
from imageq.workers.runtime.jobstate import JobState
from imageq.workers.testing.services import RedisServer, WebhookReceiver, WorkerProcess, wait_until
from imageq.workers.training.datasets import load_dataset
from tests.fixtures.s3 import S3Env
from tests.fixtures.services import Stack
from tests.helpers import png_uri

COLORS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (220, 220, 30)]
TEXTS = ["zebra zebra on the beach", "a red bus near a tree", "two dogs in snow", "a cat"]
CAPTION: dict[str, Any] = {
    "target": "caption",
    "rank": 8,
    "alpha": 16,
    "learning_rate": 5e-3,
    "max_steps": 60,
    "batch_size": 2,
    "checkpoint_every": 20,
}


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (72, 64), color).save(buf, format="PNG")
    return buf.getvalue()


def make_dataset(stack: Stack, name: str, texts: list[str | None], drop: str | None = None) -> str:
    """A zip in the deployment's storage; returns its file:// reference."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        lines = []
        for i, (color, text) in enumerate(zip(COLORS, texts, strict=True)):
            if f"{i}.png" != drop:
                archive.writestr(f"pairs/{i}.png", png(color))
            lines.append(json.dumps({"file_name": f"{i}.png", "text": text}))
        archive.writestr("pairs/metadata.jsonl", "\n".join(lines))
    path = stack.storage_path("datasets", name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path.as_uri()


@pytest.fixture(scope="module")
def ft(
    make_stack: Callable[..., Stack],
    redis_server: RedisServer,
    tiny_caption_model: Path,
    tiny_sd_model: Path,
) -> Stack:
    stack = make_stack(
        IMAGEQ_MODEL_CAPTION=str(tiny_caption_model),
        IMAGEQ_MODEL_DIFFUSION=str(tiny_sd_model),
        # Its own database, as in production; a short visibility timeout for the kill test.
        IMAGEQ_FINETUNE_BROKER_URL=redis_server.url.rsplit("/", 1)[0] + "/1",
        IMAGEQ_FINETUNE_VISIBILITY_TIMEOUT_S="4",
    )
    workers = [
        stack.worker("webhooks", "webhooks@ft", ready=False),
        stack.worker("caption", "caption@ft", ready=False),
        stack.worker("finetune", "finetune-1@ft", ready=False),
    ]
    for worker in workers:
        worker.wait_ready(stack.redis, stack.store.keys.worker(worker.name))
    stack.extra["finetune"] = workers[-1]
    return stack


def caption_text(stack: Stack, color: tuple[int, int, int], adapter: str | None = None) -> str:
    fields: dict[str, Any] = {"generation": {"max_new_tokens": 12}}
    if adapter:
        fields["adapter"] = adapter
    record = stack.client.wait(
        stack.client.caption(image=png_uri(color, (72, 64)), **fields).id, 60
    )
    assert record.status == "succeeded", record.error
    assert record.output is not None
    return str(record.output["captions"][0]["text"])


def finished(stack: Stack, record: JobRecord, timeout_s: float = 90) -> JobRecord:
    return stack.client.wait(record.id, timeout_s)


def progress_step(stack: Stack, job_id: str) -> int:
    progress = stack.client.get(job_id).progress or {}
    return int(progress.get("step", 0)) if progress.get("stage") == "training" else 0


def checkpoint_steps(stack: Stack, job_id: str) -> list[int]:
    folder = stack.storage_path("jobs", job_id, "checkpoints")
    return sorted(int(p.parent.name.split("-")[1]) for p in folder.glob("*/manifest.json"))


def test_caption_adapter_is_published_and_served_by_a_live_worker(
    ft: Stack, receiver: WebhookReceiver
) -> None:
    before = caption_text(ft, COLORS[0])
    dataset = make_dataset(ft, "pairs.zip", list(TEXTS))
    webhook = {"url": receiver.url("/ft"), "events": ["job.progress", "job.succeeded"]}
    job = ft.client.finetune(dataset=dataset, name="tiny.fr", webhook=webhook, **CAPTION)
    record = finished(ft, job)
    assert record.status == "succeeded", record.error
    out = record.output
    assert out is not None
    assert (out["name"], out["target"], out["steps"]) == ("tiny.fr", "caption", 60)
    assert out["resumed_from_step"] is None and out["checkpoints"]["steps"] == [40, 60]
    curve = [loss for _, loss in out["loss_curve"]]
    assert sum(curve[-5:]) < 0.8 * sum(curve[:5]), curve
    # Published under a revision of its own, switched to in one step.
    assert re.search(r"/adapters/tiny\.fr/r[0-9]+-[0-9a-f]+/$", out["uri"]), out["uri"]
    assert (Path(out["uri"].removeprefix("file://")) / "adapter_model.safetensors").is_file()
    assert record.metrics["examples"] == 4 and record.metrics["samples_per_s"] > 0

    (entry,) = [e for e in ft.client.adapters() if e["name"] == "tiny.fr"]
    assert entry["target"] == "caption" and entry["job_id"] == job.id
    assert entry["base_model"] == ft.settings.model_caption
    assert entry["metrics"]["final_loss"] == out["final_loss"]

    # The live caption worker loads it on first use: the learned caption comes back.
    assert caption_text(ft, COLORS[0], "tiny.fr") == TEXTS[0] != before
    assert caption_text(ft, COLORS[0]) == before
    unknown = ft.client.wait(ft.client.caption(image=png_uri(), adapter="nope").id, 60)
    assert unknown.error is not None and unknown.error.code == "invalid_input"
    assert "no adapter named 'nope'" in unknown.error.message

    progress = receiver.wait_for(
        lambda d: (
            d.path == "/ft"
            and d.json()["type"] == "job.progress"
            and d.json()["data"]["progress"].get("stage") == "training"
        ),
        count=2,
    )
    data = progress[-1].json()["data"]["progress"]
    assert data["total"] == 60 and {"loss", "eta_s", "samples_per_s"} <= set(data)

    # The name is taken: refused before any training, then replaced with overwrite.
    taken = finished(ft, ft.client.finetune(dataset=dataset, name="tiny.fr", **CAPTION))
    assert taken.status == "failed" and taken.error is not None
    assert taken.error.code == "invalid_input" and "overwrite" in taken.error.message
    assert taken.progress is None
    shifted = make_dataset(ft, "shifted.zip", TEXTS[1:] + TEXTS[:1])
    again = ft.client.finetune(dataset=shifted, name="tiny.fr", overwrite=True, **CAPTION)
    assert finished(ft, again).status == "succeeded"
    # Re-published: the same worker reloads the new version without a restart.
    assert caption_text(ft, COLORS[0], "tiny.fr") == TEXTS[1]


def broker_holds(broker: redis.Redis, job_id: str) -> bool:
    """The job's message is in this database: unacknowledged, or back in its queue (this
    stack's 4 s visibility timeout puts a running fine-tune's message back there while
    the worker's one thread is busy with it)."""
    needle = job_id.encode()
    if any(needle in raw for raw in broker.hvals("unacked")):
        return True
    return any(
        needle in raw
        for key in broker.scan_iter(count=1000)
        if broker.type(key) == b"list"
        for raw in broker.lrange(key, 0, -1)
    )


def test_a_killed_worker_resumes_from_its_last_checkpoint(ft: Stack) -> None:
    dataset = make_dataset(ft, "resume.zip", list(TEXTS))
    job = ft.client.finetune(
        target="diffusion",
        dataset=dataset,
        name="tiny-sd-style",
        resolution=64,
        max_steps=150,
        checkpoint_every=20,
        batch_size=2,
        learning_rate=1e-3,
    )
    long_broker = redis.Redis.from_url(ft.settings.long_broker_url)
    wait_until(lambda: progress_step(ft, job.id) >= 50, 60, "training past step 50")
    # The message is in the finetune broker's own database, not the inference one's.
    assert broker_holds(long_broker, job.id) and not broker_holds(ft.redis, job.id)
    first: WorkerProcess = ft.extra["finetune"]
    first.kill()
    killed_at = progress_step(ft, job.id)
    saved = checkpoint_steps(ft, job.id)
    assert saved and saved[-1] >= 40 and ft.client.get(job.id).status == "running"

    ft.extra["finetune"] = ft.worker("finetune", "finetune-2@ft")
    record = finished(ft, job, 120)
    assert record.status == "succeeded", record.error
    assert record.output is not None
    print(f"killed at step {killed_at}; resumed from {record.output['resumed_from_step']}")
    assert record.output["resumed_from_step"] == saved[-1] < 150
    assert record.output["steps"] == 150 and record.attempt == 2
    assert record.metrics["steps_run"] == 150 - saved[-1]
    assert record.worker == "finetune-2@ft"
    assert record.output["checkpoints"]["steps"] == [140, 150]
    wrong = ft.client.wait(ft.client.caption(image=png_uri(), adapter="tiny-sd-style").id, 60)
    assert wrong.error is not None and "a diffusion adapter" in wrong.error.message

    if importlib.util.find_spec("imageq.workers.kinds.diffusion") is None:
        return
    ft.worker("diffusion", "sd@ft")
    images = []
    for adapters in ([], [{"name": "tiny-sd-style"}]):
        gen = ft.client.generate("a cat", width=64, height=64, steps=3, seed=5, adapters=adapters)
        done = finished(ft, gen, 60)
        assert done.status == "succeeded", done.error
        assert done.output is not None
        uri = done.output["images"][0]["uri"]
        images.append(Path(uri.removeprefix("file://")).read_bytes())
    assert images[0] != images[1]


def test_a_second_worker_never_trains_a_live_job_and_cancel_keeps_the_checkpoint(
    ft: Stack,
) -> None:
    spare = ft.worker("finetune", "finetune-3@ft")
    dataset = make_dataset(ft, "cancel.zip", list(TEXTS))
    job = ft.client.finetune(
        dataset=dataset, name="never-cancel", **{**CAPTION, "max_steps": 100_000}
    )
    wait_until(lambda: checkpoint_steps(ft, job.id)[-1:] >= [40], 60, "two checkpoints")
    owner = ft.client.get(job.id).worker
    other = spare if owner != spare.name else ft.extra["finetune"]
    # It trains on a pool thread, not inside the consumer's event loop (Celery's solo
    # pool, where a busy worker answered nothing): remote control works mid-run.
    control = Celery("ft-control", broker=ft.settings.long_broker_url, set_as_current=False)
    assert owner is not None
    assert control.control.ping(destination=[owner], timeout=3) == [{owner: {"ok": "pong"}}]
    active = control.control.inspect(destination=[owner], timeout=3).active() or {}
    assert [task["id"] for task in active.get(owner, [])] == [job.id]

    # Past the 4 s visibility timeout the message comes back while its worker lives: the
    # other worker gets it, finds the lease held, and puts it off, again and again.
    def deferred() -> bool:
        lines = other.log_path.read_text(errors="replace").splitlines()
        return any(job.id in line and "retry: Retry in" in line for line in lines)

    wait_until(deferred, 30, "a deferred redelivery", every_s=0.5)
    ft.client.cancel(job.id)
    record = finished(ft, job, 30)
    assert record.status == "canceled" and record.error is not None
    assert record.error.code == "canceled"
    # One attempt: a redelivery that waited for the lease is not a lost worker.
    assert record.attempt == 1 and record.worker == owner
    assert record.progress is not None and record.progress["step"] < 100_000
    kept = checkpoint_steps(ft, job.id)
    assert kept and record.metrics["last_checkpoint_step"] == kept[-1]
    assert "never-cancel" not in {e["name"] for e in ft.client.adapters()}
    assert ft.extra["finetune"].alive() and spare.alive()


def test_timeout_fails_the_job_and_keeps_the_checkpoint(ft: Stack) -> None:
    dataset = make_dataset(ft, "timeout.zip", list(TEXTS))
    job = ft.client.finetune(
        dataset=dataset, name="never-timeout", timeout_s=10, **{**CAPTION, "max_steps": 100_000}
    )
    # What a user sees: `imageq get ID --follow` draws progress until the job ends.
    follow = subprocess.run(
        [sys.executable, "-m", "imageq.api_client.cli", "get", job.id, "--follow"],
        env=ft.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "training loss" in follow.stderr, follow.stderr
    record = JobRecord.model_validate(json.loads(follow.stdout))
    assert record.status == "failed" and record.error is not None
    assert record.error.code == "timeout"
    assert record.metrics["last_checkpoint_step"] == checkpoint_steps(ft, job.id)[-1]


@pytest.mark.parametrize(
    "texts, drop, problem",
    [
        (list(TEXTS), "2.png", "2.png: file missing"),
        ([*TEXTS[:3], " "], None, "3.png: empty text"),
    ],
)
def test_a_bad_dataset_fails_as_invalid_input_naming_the_file(
    ft: Stack, texts: list[str | None], drop: str | None, problem: str
) -> None:
    dataset = make_dataset(ft, f"bad-{drop}.zip", texts, drop=drop)
    record = finished(ft, ft.client.finetune(dataset=dataset, name="bad", **CAPTION), 60)
    assert record.status == "failed" and record.error is not None
    assert record.error.code == "invalid_input" and problem in record.error.message
    assert ft.extra["finetune"].alive()


def test_auto_caption_runs_inside_the_finetune_job(ft: Stack, receiver: WebhookReceiver) -> None:
    dataset = make_dataset(ft, "unlabelled.zip", [TEXTS[0], None, None, None])
    webhook = {"url": receiver.url("/ft-auto"), "events": ["job.progress", "job.succeeded"]}
    job = ft.client.finetune(
        dataset=dataset,
        name="auto",
        auto_caption=True,
        webhook=webhook,
        **{**CAPTION, "max_steps": 4},
    )
    record = finished(ft, job)
    assert record.status == "succeeded", record.error
    # Every progress event of every stage arrives: none shares a webhook-id with another
    # (stages count from 0, and publishing follows the last step).
    receiver.wait_for(
        lambda d: d.path == "/ft-auto" and d.json()["type"] == "job.succeeded", timeout_s=30
    )
    events = [
        d
        for d in receiver.deliveries
        if d.path == "/ft-auto" and d.json()["type"] == "job.progress"
    ]
    ids = [d.headers["webhook-id"] for d in events]
    assert len(ids) == len(set(ids)), ids
    stages = [d.json()["data"]["progress"].get("stage") for d in events]
    assert {"dataset", "auto_caption", "training", "publishing"} <= set(stages), stages
    # Before ids were unique per stage, auto_caption (step 0) shared the dataset stage's id
    # and publishing the last training step's: both were dropped as duplicates.
    assert stages.index("dataset") < stages.index("auto_caption") < stages.index("publishing")
    for webhook_id in ids:
        assert ft.redis.get(ft.store.keys.webhook_done(webhook_id)) == "delivered"
    assert record.metrics["auto_captioned"] == 3
    captions = json.loads(ft.storage_path("jobs", job.id, "auto_captions.json").read_text())
    assert sorted(captions) == ["1.png", "2.png", "3.png"] and all(captions.values())
    # Captioned in the fine-tune's own process: no caption jobs.
    assert not [
        r for r in ft.client.list(kind="caption") if r.metadata.get("finetune_job") == job.id
    ]


def test_datasets_on_s3(s3_env: S3Env, tmp_path: Path) -> None:
    settings = Settings(storage_url=f"s3://{s3_env.bucket}/deploy")
    storage = S3Storage(s3_env.bucket, "deploy", settings)
    other = f"{s3_env.bucket}-other"
    client = boto3_client(s3_env)
    client.create_bucket(Bucket=other)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("0.png", png(COLORS[0]))
        archive.writestr("metadata.jsonl", json.dumps({"file_name": "0.png", "text": "x"}))
    storage.put("datasets/one.zip", buf.getvalue(), "application/zip")
    client.put_object(Bucket=other, Key="sets/one.zip", Body=buf.getvalue())
    client.put_object(Bucket=other, Key="pets/0.png", Body=png(COLORS[0]))
    client.put_object(
        Bucket=other, Key="pets/metadata.jsonl", Body=json.dumps({"file_name": "0.png"})
    )
    refs = {
        f"s3://{s3_env.bucket}/deploy/datasets/one.zip": [("0.png", "x")],
        f"s3://{other}/sets/one.zip": [("0.png", "x")],
        f"s3://{other}/pets/": [("0.png", None)],
    }
    for i, (ref, expected) in enumerate(refs.items()):
        dataset = load_dataset(ref, tmp_path / str(i), settings, storage, allow_missing_text=True)
        assert [(e.file_name, e.text) for e in dataset.examples] == expected, ref


def boto3_client(s3_env: S3Env) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=s3_env.endpoint_url, region_name="us-east-1")


def test_a_lapsed_lease_is_taken_back_unless_another_worker_holds_it(ft: Stack) -> None:
    """Redis away longer than the lease TTL must not leave an hours-long run unprotected."""
    store, key = ft.store, ft.store.keys.lease("lease-test")
    assert JobState(store).acquire_lease("lease-test", "me/1")
    with LeaseKeeper(store, "lease-test", "me/1", every_s=0.05) as keeper:
        ft.redis.delete(key)  # expired while the heartbeat could not reach Redis
        wait_until(
            lambda: JobState(store).lease_holder("lease-test") == "me/1", 5, "lease taken back"
        )
        assert not keeper.lost
        ft.redis.set(key, "other/2")
        wait_until(lambda: keeper.lost, 5, "lease lost to another worker")
        assert JobState(store).lease_holder("lease-test") == "other/2"
    # Leaving never releases a lease this worker no longer holds.
    assert JobState(store).lease_holder("lease-test") == "other/2"
