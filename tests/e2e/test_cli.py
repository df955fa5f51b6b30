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
        [sys.executable, "-m", "imageq.api_client.cli", *args],
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


@pytest.fixture(scope="module")
def camera_photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A photo the size a phone takes: 4000x3000 pixels, several MB of JPEG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(7)
    # Smooth gradients plus sensor noise: compresses like a real photo, not like a flat fill.
    y, x = np.mgrid[0:3000, 0:4000]
    base = np.stack([(x // 16) % 256, (y // 12) % 256, ((x + y) // 20) % 256], axis=-1)
    noisy = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("photos") / "IMG_0001.jpg"
    Image.fromarray(noisy).save(path, format="JPEG", quality=90)
    return path


def test_a_camera_photo_is_uploaded_and_captioned(stack: Stack, camera_photo: Path) -> None:
    size = camera_photo.stat().st_size
    assert size > 3 * 1024 * 1024, size  # far over the inline (data URI) cap
    done = imageq(stack.env, "submit", "caption", str(camera_photo), "--wait")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["status"] == "succeeded", record["error"]
    assert record["output"]["captions"][0]["text"]
    uploads = list(stack.storage_path("uploads").rglob("*.jpg"))
    assert [p.stat().st_size for p in uploads] == [size]


def test_a_photo_over_the_caps_is_refused_before_anything_is_sent(
    stack: Stack, camera_photo: Path
) -> None:
    before = (
        set(stack.storage_path("uploads").rglob("*"))
        if stack.storage_path("uploads").exists()
        else set()
    )
    few_pixels = {**stack.env, "IMAGEQ_MAX_IMAGE_PIXELS": "1000000"}
    refused = imageq(few_pixels, "submit", "caption", str(camera_photo))
    assert refused.returncode == 2
    assert "4000x3000" in refused.stderr and "IMAGEQ_MAX_IMAGE_PIXELS" in refused.stderr
    few_bytes = {**stack.env, "IMAGEQ_MAX_IMAGE_BYTES": "1000000"}
    refused = imageq(few_bytes, "submit", "caption", str(camera_photo))
    assert refused.returncode == 2 and "IMAGEQ_MAX_IMAGE_BYTES" in refused.stderr
    after = (
        set(stack.storage_path("uploads").rglob("*"))
        if stack.storage_path("uploads").exists()
        else set()
    )
    assert after == before
