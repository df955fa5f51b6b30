"""``imageq flower`` as a real process: basic auth enforced, jobs listed by id and name,
each job's task in the state its job ended in, and the counts agreeing everywhere."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from imageq.api_client.names import queue_name
from imageq.api_client.settings import Settings
from imageq.workers.ops.flower import build_parser, flower_argv, flower_env
from imageq.workers.testing.services import free_port, wait_until
from tests.fixtures.services import Stack
from tests.helpers import png_uri

AUTH = ("ops", "s3cret-flower")
WORKER = "caption-flower@test"
MIXED_WORKER = "caption-mixed@test"
# Workers here refuse private and metadata addresses (forbidden_url), and photos over
# 40,000 pixels (invalid_input), as a production worker does with its own limits.
STRICT = {"IMAGEQ_ALLOW_PRIVATE_URLS": "0", "IMAGEQ_MAX_IMAGE_PIXELS": "40000"}
METADATA_URL = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"


def flower_command(*extra: str) -> list[str]:
    return [sys.executable, "-m", "imageq.api_client.cli", "flower", *extra]


@pytest.fixture(scope="module")
def stack(make_stack: Callable[..., Stack], tiny_caption_model: Path) -> Stack:
    s = make_stack(IMAGEQ_MODEL_CAPTION=str(tiny_caption_model))
    s.worker("caption", WORKER, **STRICT)
    return s


@pytest.fixture(scope="module")
def flower(stack: Stack) -> Iterator[str]:
    port = free_port()
    env = {**stack.env, "IMAGEQ_FLOWER_BASIC_AUTH": ":".join(AUTH)}
    log_path = stack.tmp / "logs" / "flower.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            flower_command("--port", str(port), "--address", "127.0.0.1"),
            env=env,
            stdout=log,
            stderr=log,
        )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"flower exited {proc.returncode}: {log_path.read_text()[-3000:]}")
        try:
            requests.get(base + "/healthcheck", timeout=1)
            return True
        except requests.ConnectionError:
            return False

    try:
        wait_until(answers, 60, "flower", every_s=0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_refuses_to_start_without_basic_auth(stack: Stack) -> None:
    env = {k: v for k, v in stack.env.items() if k != "IMAGEQ_FLOWER_BASIC_AUTH"}
    done = subprocess.run(
        flower_command("--port", "1"), env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "IMAGEQ_FLOWER_BASIC_AUTH" in done.stderr and "user:password" in done.stderr
    bad = subprocess.run(
        flower_command("--port", "1"),
        env={**env, "IMAGEQ_FLOWER_BASIC_AUTH": "only-a-password"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "not user:password" in bad.stderr
    assert "only-a-password" not in bad.stderr


def test_credentials_travel_in_the_environment_not_argv() -> None:
    settings = Settings.from_env({"IMAGEQ_FLOWER_BASIC_AUTH": "ops:pw1, dev:pw2"})
    base = {"FLOWER_UNAUTHENTICATED_API": "true", "PATH": "/bin"}
    env = flower_env(settings, base, finetune=False)
    assert env["FLOWER_BASIC_AUTH"] == "ops:pw1,dev:pw2"
    assert "FLOWER_UNAUTHENTICATED_API" not in env
    args, rest = build_parser().parse_known_args(["--port", "7000", "--purge_offline_workers=60"])
    argv = flower_argv(args, rest)
    assert argv[-1] == "--purge_offline_workers=60" and "--port=7000" in argv
    assert "--address=127.0.0.1" in argv
    assert not [a for a in argv if "pw1" in a]
    assert flower_env(settings, base, finetune=True)["IMAGEQ_WORKER_KIND"] == "finetune"


def test_finetune_flower_needs_the_finetune_broker(stack: Stack) -> None:
    env = {**stack.env, "IMAGEQ_FLOWER_BASIC_AUTH": ":".join(AUTH)}
    env.pop("IMAGEQ_FINETUNE_BROKER_URL", None)
    done = subprocess.run(
        flower_command("--finetune"), env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "IMAGEQ_FINETUNE_BROKER_URL" in done.stderr


def test_basic_auth_required(flower: str) -> None:
    for path in ("/", "/tasks", "/api/tasks", "/api/workers"):
        assert requests.get(flower + path, timeout=10).status_code == 401, path
    wrong = requests.get(flower + "/api/tasks", auth=(AUTH[0], "nope"), timeout=10)
    assert wrong.status_code == 401
    assert requests.get(flower + "/api/tasks", auth=AUTH, timeout=10).status_code == 200
    assert requests.get(flower + "/tasks", auth=AUTH, timeout=10).status_code == 200
    # Flower leaves its health check open by design (container health checks use it).
    assert requests.get(flower + "/healthcheck", timeout=10).text == "OK"


def test_the_broker_views_answer_while_the_worker_runs_its_own_transport(
    stack: Stack, flower: str
) -> None:
    # Flower picks its broker client by the URL's scheme: it must keep kombu's transport
    # (a named one replaces the scheme); the worker runs imageq's (its banner says so).
    worker_log = stack.tmp / "logs" / f"{WORKER}.log"
    assert "imageq.workers.runtime.redis_transport:Transport://" in worker_log.read_text()
    lengths = requests.get(flower + "/api/queues/length", auth=AUTH, timeout=10)
    assert lengths.status_code == 200, lengths.text[:300]
    # Lengths read from Redis (the app's queues; a worker's own appear once Flower has
    # inspected it).
    counts = {q["name"]: q["messages"] for q in lengths.json()["active_queues"]}
    assert isinstance(counts[queue_name("default", stack.settings.queue_prefix)], int)
    assert requests.get(flower + "/broker", auth=AUTH, timeout=10).status_code == 200


def test_job_listed_by_id_with_kind_task_name(stack: Stack, flower: str) -> None:
    def worker_seen() -> bool:
        status = requests.get(flower + "/api/workers?status=true", auth=AUTH, timeout=10)
        return bool(status.ok and status.json().get(WORKER))

    # Worker heartbeats reaching Flower show its event receiver is connected.
    wait_until(worker_seen, 30, "flower to see the worker's events", every_s=0.5)
    image = png_uri((10, 120, 240))
    job = stack.client.caption(image=image, metadata={"order": "f-1"})
    assert stack.client.wait(job.id, 60).status == "succeeded"

    def listed() -> dict[str, Any] | None:
        tasks = requests.get(flower + "/api/tasks", auth=AUTH, timeout=10).json()
        task = tasks.get(job.id)
        return task if task and task.get("state") == "SUCCESS" else None

    wait_until(lambda: listed() is not None, 20, "the job in Flower's task list", every_s=0.3)
    task = listed()
    assert task is not None
    assert task["name"] == "imageq.caption"
    assert task["uuid"] == job.id
    assert task["worker"] == WORKER
    # The inline image never reaches Flower: arguments show the client's redacted copy.
    args = str(task.get("args"))
    assert image.split(",", 1)[1][:40] not in args and "f-1" in args
    by_name = requests.get(
        flower + "/api/tasks", params={"taskname": "imageq.caption"}, auth=AUTH, timeout=10
    ).json()
    assert job.id in by_name


def task_info(flower: str, job_id: str) -> dict[str, Any]:
    answer = requests.get(f"{flower}/api/task/info/{job_id}", auth=AUTH, timeout=10)
    return dict(answer.json()) if answer.ok else {}


def wait_for_state(flower: str, job_id: str, state: str) -> dict[str, Any]:
    wait_until(
        lambda: task_info(flower, job_id).get("state") == state,
        30,
        f"Flower to show {job_id} as {state} (now {task_info(flower, job_id).get('state')})",
        every_s=0.3,
    )
    return task_info(flower, job_id)


def test_failed_jobs_are_failed_tasks(stack: Stack, flower: str) -> None:
    good = stack.client.caption(image=png_uri((30, 160, 60)))
    # An oversized photo (400 x 300 over this worker's 40,000-pixel cap) and a URL of a
    # cloud metadata service: both fail, each with its own code.
    big = stack.client.caption(image=png_uri((200, 200, 10), (400, 300)))
    metadata = stack.client.caption(image=METADATA_URL)
    assert stack.client.wait(good.id, 60).status == "succeeded"
    big_record = stack.client.wait(big.id, 60)
    assert big_record.status == "failed" and big_record.error is not None
    assert big_record.error.code == "invalid_input"
    metadata_record = stack.client.wait(metadata.id, 60)
    assert metadata_record.status == "failed" and metadata_record.error is not None
    assert metadata_record.error.code == "forbidden_url"

    ok = wait_for_state(flower, good.id, "SUCCESS")
    assert "'succeeded'" in str(ok.get("result"))
    failed_big = wait_for_state(flower, big.id, "FAILURE")
    # The exception names the error code in its type and its message, and carries the
    # record's message; an expected failure shows no traceback.
    assert failed_big["exception"] == repr_of("InvalidInput", big_record.error)
    assert not failed_big.get("traceback")
    failed_metadata = wait_for_state(flower, metadata.id, "FAILURE")
    assert failed_metadata["exception"] == repr_of("ForbiddenUrl", metadata_record.error)
    assert not failed_metadata.get("traceback")
    for info in (failed_big, failed_metadata):
        assert info["worker"] == WORKER and not info.get("retries")

    # One attempt each, acknowledged: no retry, no redelivery.
    for job in (good, big, metadata):
        assert stack.client.get(job.id).attempt == 1
    assert not unacked_ids(stack) & {good.id, big.id, metadata.id}
    # result.json is written for every final status, failures included.
    for job in (big, metadata):
        stored = json.loads(stack.storage_path("jobs", job.id, "result.json").read_text())
        assert stored["status"] == "failed"
    # Celery logs expected failures on one line at INFO, without a traceback.
    log = (stack.tmp / "logs" / f"{WORKER}.log").read_text()
    expected = [line for line in log.splitlines() if big.id in line and "raised expected" in line]
    assert expected and "InvalidInput('invalid_input:" in expected[0]
    assert "raised unexpected" not in log and "Traceback" not in log


def repr_of(type_name: str, error: Any) -> str:
    return f"{type_name}({f'{error.code}: {error.message}'!r})"


def unacked_ids(stack: Stack) -> set[str]:
    """Task ids of every message some worker holds unacknowledged (kombu's hash)."""
    ids = set()
    for raw in stack.redis.hvals("unacked"):
        message = json.loads(raw)[0]
        ids.add(str((message.get("headers") or {}).get("id")))
    return ids


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    text = requests.get(url, auth=AUTH, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_mixed_run_counts_agree_everywhere(
    make_stack: Callable[..., Stack], tiny_caption_model: Path, flower: str
) -> None:
    """30 jobs end succeeded, failed (two codes) and canceled; Flower's task states and
    dashboard counters, Flower's and the worker's Prometheus counters, the records and
    `imageq status` all tell the same story."""
    mixed = make_stack(IMAGEQ_MODEL_CAPTION=str(tiny_caption_model))
    good = [mixed.client.caption(image=png_uri((i * 12, 90, 200))) for i in range(21)]
    big = [mixed.client.caption(image=png_uri((i * 40, 9, 9), (300, 300))) for i in range(5)]
    metadata = [mixed.client.caption(image=METADATA_URL) for _ in range(4)]
    # Nobody serves the queue yet: these five are canceled while queued, deterministically.
    canceled = good[:5]
    for job in canceled:
        assert mixed.client.cancel(job.id).status == "canceled"
    port = free_port()
    mixed.worker(
        "caption",
        MIXED_WORKER,
        IMAGEQ_METRICS_PORT=str(port),
        IMAGEQ_METRICS_ADDRESS="127.0.0.1",
        **STRICT,
    )
    ids = {job.id for job in good + big + metadata}
    assert len(ids) == 30
    # The worker still receives the canceled jobs' messages: each ends REVOKED there.
    records = {job_id: mixed.client.wait(job_id, 120) for job_id in ids}
    by_status = Counter(str(r.status) for r in records.values())
    assert by_status == {"succeeded": 16, "failed": 9, "canceled": 5}
    codes = Counter(r.error.code for r in records.values() if r.error is not None)
    assert codes == {"invalid_input": 5, "forbidden_url": 4, "canceled": 5}
    listed = Counter(str(r.status) for r in mixed.client.list(kind="caption") if r.id in ids)
    assert listed == by_status

    # `imageq status` right after the last job: the worker's done count has every job.
    status = subprocess.run(
        [sys.executable, "-m", "imageq.api_client.cli", "status"],
        env=mixed.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    line = next(x for x in status.stdout.splitlines() if x.startswith(MIXED_WORKER))
    assert line.split()[-3] == "30", status.stdout  # done
    caption = next(x for x in status.stdout.splitlines() if x.split()[:1] == ["caption"])
    assert caption.split()[1:6] == ["0", "0", "16", "9", "5"], status.stdout

    state_of = {"succeeded": "SUCCESS", "failed": "FAILURE", "canceled": "REVOKED"}
    expected_states = Counter(state_of[s] for s in by_status.elements())

    def flower_states() -> Counter[str]:
        tasks = requests.get(
            flower + "/api/tasks", params={"workername": MIXED_WORKER}, auth=AUTH, timeout=10
        ).json()
        return Counter(t["state"] for job_id, t in tasks.items() if job_id in ids)

    wait_until(lambda: flower_states() == expected_states, 30, "Flower's task states")
    # Canceled tasks say why, in grey rather than red.
    revoked = task_info(flower, canceled[0].id)
    assert revoked["state"] == "REVOKED"
    assert "canceled: canceled before it started" in str(revoked.get("exception"))

    # Flower's dashboard counters (the Workers page) for this worker.
    dashboard = requests.get(flower + "/workers", params={"json": 1}, auth=AUTH, timeout=10)
    row = next(w for w in dashboard.json()["data"] if w.get("hostname") == MIXED_WORKER)
    assert row.get("task-received") == 30
    assert row.get("task-succeeded") == 16 and row.get("task-failed") == 9
    assert row.get("task-revoked") == 5 and not row.get("task-retried")

    # Flower's Prometheus counters, then the worker's own.
    flower_metrics = scrape(flower + "/metrics")

    def events(kind: str) -> float:
        labels = (("task", "imageq.caption"), ("type", kind), ("worker", MIXED_WORKER))
        return flower_metrics.get(("flower_events_total", labels), 0.0)

    assert (events("task-succeeded"), events("task-failed"), events("task-revoked")) == (
        16,
        9,
        5,
    )
    worker_metrics = scrape(f"http://127.0.0.1:{port}/metrics")
    for status_name, count in by_status.items():
        labels = (("kind", "caption"), ("status", status_name))
        assert worker_metrics[("imageq_jobs_total", labels)] == count, status_name
    # Only the jobs that ran have a run time; the canceled ones never started.
    assert worker_metrics[("imageq_run_seconds_count", (("kind", "caption"),))] == 25

    # Delivery unchanged: one attempt for each job that ran, every message acknowledged,
    # result.json for every final status.
    assert all(records[j].attempt == 1 for j in ids if records[j].status != "canceled")
    assert not unacked_ids(mixed) & ids
    for job_id, record in records.items():
        stored = json.loads(mixed.storage_path("jobs", job_id, "result.json").read_text())
        assert stored["status"] == record.status
