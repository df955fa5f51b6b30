"""The ``imageq`` command line as a newcomer runs it: submit, get, cancel, demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.services import Stack

SAMPLE = Path(__file__).resolve().parents[2] / "workers" / "testing" / "assets" / "sample.png"


def imageq(env: dict[str, str], *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "api_client.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@pytest.fixture(scope="module")
def stack(make_stack: Callable[..., Stack], tiny_caption_model: Path) -> Stack:
    s = make_stack(IMAGEQ_MODEL_CAPTION=str(tiny_caption_model))
    s.worker("caption", "caption@cli")
    return s


def test_submit_wait_get_and_cancel(stack: Stack) -> None:
    done = imageq(stack.env, "submit", "caption", str(SAMPLE), "--wait")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["status"] == "succeeded" and record["output"]["captions"][0]["text"]
    got = imageq(stack.env, "get", record["id"])
    assert json.loads(got.stdout)["id"] == record["id"]
    # A deployment prefix no worker serves: the job stays queued until canceled.
    idle = {**stack.env, "IMAGEQ_QUEUE_PREFIX": stack.env["IMAGEQ_QUEUE_PREFIX"] + "idle-"}
    job_id = imageq(idle, "submit", "caption", str(SAMPLE)).stdout.strip()
    assert json.loads(imageq(idle, "get", job_id).stdout)["status"] == "queued"
    canceled = json.loads(imageq(idle, "cancel", job_id).stdout)
    assert canceled["status"] == "canceled" and canceled["error"]["code"] == "canceled"
    missing = imageq(stack.env, "get", "no-such-job")
    assert missing.returncode == 2 and "no job" in missing.stderr


def test_bad_input_is_refused_with_the_field_named(stack: Stack) -> None:
    bad = imageq(
        stack.env, "submit", "caption", str(SAMPLE), "--input", '{"generation": {"num_beams": 50}}'
    )
    assert bad.returncode == 2
    assert "input.generation.num_beams" in bad.stderr


def test_demo_tiny_runs_end_to_end_and_stops_what_it_started(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEQ_")}
    env["IMAGEQ_STORAGE_URL"] = f"file://{tmp_path / 'data'}"
    env["OMP_NUM_THREADS"] = "1"
    run = imageq(env, "demo", "--tiny", timeout_s=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "MEANINGLESS" in run.stdout
    assert "caption: '" in run.stdout
    assert "signature verified" in run.stdout
    result = next((tmp_path / "data" / "jobs").glob("*/result.json"))
    assert json.loads(result.read_text())["status"] == "succeeded"
