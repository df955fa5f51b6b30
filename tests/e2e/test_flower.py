"""``imageq flower`` as a real process: basic auth enforced, jobs listed by id and name."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from api_client.settings import Settings
from tests.fixtures.services import Stack
from tests.helpers import png_uri
from workers.ops.flower import build_parser, flower_argv, flower_env
from workers.testing.services import free_port, wait_until

AUTH = ("ops", "s3cret-flower")
WORKER = "caption-flower@test"


def flower_command(*extra: str) -> list[str]:
    return [sys.executable, "-m", "api_client.cli", "flower", *extra]


@pytest.fixture(scope="module")
def stack(make_stack: Callable[..., Stack], tiny_caption_model: Path) -> Stack:
    s = make_stack(IMAGEQ_MODEL_CAPTION=str(tiny_caption_model))
    s.worker("caption", WORKER)
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
