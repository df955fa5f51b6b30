"""Screenshots of Flower as an operator sees it: succeeded, failed and canceled jobs.

Run through ``scripts/flower_screenshot.sh`` (it checks for Chromium first). Starts a
private redis-server, a caption worker on a tiny random BLIP (offline; its captions are
meaningless, the states are real), ``imageq flower`` behind basic auth, submits a mixed
set of jobs, then photographs Flower's Tasks and Workers pages with headless Chromium:

- a photo over the worker's pixel cap: FAILURE, ``InvalidInput('invalid_input: ...')``
- a cloud metadata URL: FAILURE, ``ForbiddenUrl('forbidden_url: ...')``
- jobs canceled while queued: REVOKED (and their ``imageq.finalize`` on the webhooks
  worker: SUCCESS)
- the rest: SUCCESS

Writes docs/img/flower-tasks.png and docs/img/flower-workers.png (or ``--out DIR``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imageq.api_client.client import Client  # noqa: E402
from imageq.api_client.records import connect  # noqa: E402
from imageq.api_client.settings import Settings, process_environment  # noqa: E402
from imageq.workers.testing.services import (  # noqa: E402
    RedisServer,
    WorkerProcess,
    free_port,
    wait_until,
)
from imageq.workers.testing.tiny import build_tiny_caption  # noqa: E402
from tests.helpers import png_uri  # noqa: E402

USER, PASSWORD = "ops", "screenshot-only-password"
WORKER = "caption-gpu0@demo-host"
METADATA_URL = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("chromium not found: apt-get update && apt-get install -y chromium")


def screenshot(browser: str, url: str, out: Path, size: str = "1500,760") -> None:
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={size}",
            # Flower fills its tables from XHR after the page loads.
            "--virtual-time-budget=8000",
            f"--screenshot={out}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    browser = chromium()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="imageq-flower-shot-") as tmp_dir:
        tmp = Path(tmp_dir)
        redis_server = RedisServer(tmp / "redis").start()
        env = {k: v for k, v in process_environment().items() if not k.startswith("IMAGEQ_")}
        env.update(
            IMAGEQ_BROKER_URL=redis_server.url,
            IMAGEQ_STORAGE_URL=f"file://{tmp / 'storage'}",
            IMAGEQ_MODEL_CAPTION=str(build_tiny_caption(tmp / "tiny-caption")),
            IMAGEQ_FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}",
            # A production worker's URL guard (metadata and private addresses refused)
            # and a small pixel cap, so an "oversized photo" stays small here.
            IMAGEQ_ALLOW_PRIVATE_URLS="0",
            IMAGEQ_MAX_IMAGE_PIXELS="40000",
            OMP_NUM_THREADS="1",
        )
        settings = Settings.from_env(env)
        client = Client(settings)
        port = free_port()
        flower_log = (tmp / "flower.log").open("wb")
        flower = subprocess.Popen(
            [sys.executable, "-m", "imageq.api_client.cli", "flower", "--port", str(port)],
            env=env,
            stdout=flower_log,
            stderr=flower_log,
            cwd=ROOT,
        )
        worker = WorkerProcess("caption", env, WORKER, tmp / "worker.log")
        # As in production: finalizes jobs canceled while queued (imageq.finalize).
        webhooks = WorkerProcess("webhooks", env, "webhooks@demo-host", tmp / "webhooks.log")
        base = f"http://127.0.0.1:{port}"
        try:

            def flower_up() -> bool:
                try:
                    return requests.get(base + "/healthcheck", timeout=1).ok
                except requests.ConnectionError:
                    return False

            wait_until(flower_up, 60, "flower", every_s=0.3)
            # Queued before the worker starts, so the canceled ones are canceled for sure.
            jobs = [client.caption(image=png_uri((i * 20, 120, 200))) for i in range(8)]
            jobs.append(client.caption(image=png_uri((220, 180, 20), (400, 300))))
            jobs.append(client.caption(image=METADATA_URL))
            jobs.append(client.caption(image=png_uri((10, 10, 10), (640, 480))))
            for job in (jobs[2], jobs[5]):
                client.cancel(job.id)
            redis_client = connect(settings.records_redis_url)
            webhooks.start().wait_ready(redis_client, client.store.keys.worker(webhooks.name))
            worker.start().wait_ready(redis_client, client.store.keys.worker(WORKER))
            records = [client.wait(job.id, 120) for job in jobs]
            print("jobs:", dict(Counter(str(r.status) for r in records)))

            final = {"SUCCESS", "FAILURE", "REVOKED"}

            def flower_caught_up() -> bool:
                tasks = requests.get(
                    base + "/api/tasks",
                    params={"taskname": "imageq.caption"},
                    auth=(USER, PASSWORD),
                    timeout=5,
                ).json()
                return all(tasks.get(job.id, {}).get("state") in final for job in jobs)

            wait_until(flower_caught_up, 30, "flower to see every job end", every_s=0.3)
            time.sleep(1)
            auth_base = f"http://{USER}:{PASSWORD}@127.0.0.1:{port}"
            screenshot(browser, auth_base + "/tasks", args.out / "flower-tasks.png", "1900,900")
            screenshot(browser, auth_base + "/workers", args.out / "flower-workers.png", "1500,560")
        finally:
            worker.stop()
            webhooks.stop()
            flower.terminate()
            flower.wait(10)
            client.close()
            redis_server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
