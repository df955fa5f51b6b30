"""What imageq adds to a bare Celery round trip, measured side by side in one run.

The same tiny caption model, the same Redis, the same thread pool: imageq's caption
worker against a bare Celery task that calls the model directly (``bench/bare_app.py``).
Prints p50/p99 latency from submit to result-visible-to-client, jobs/s, their ratios,
and how long a finished result takes to reach a waiting client.

    python bench/queue_overhead.py [--jobs 200] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import base64
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from celery import Celery

from imageq.api_client.client import Client
from imageq.api_client.records import connect, parse_time
from imageq.api_client.settings import Settings, process_environment
from imageq.workers.testing.services import RedisServer, WorkerProcess, wait_until
from imageq.workers.testing.tiny import build_tiny_caption

ROOT = Path(__file__).resolve().parent.parent


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def image_uri() -> str:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 30, 200)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run(jobs: int, concurrency: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="imageq-bench-"))
    redis_server = RedisServer(tmp / "redis", appendonly=False).start()
    model = build_tiny_caption(tmp / "tiny-caption")
    env = process_environment()
    env.update(
        IMAGEQ_BROKER_URL=redis_server.url,
        IMAGEQ_MODEL_CAPTION=str(model),
        IMAGEQ_STORAGE_URL=f"file://{tmp / 'storage'}",
        IMAGEQ_QUEUE_PREFIX="bench-",
        OMP_NUM_THREADS="1",
        BENCH_BROKER_URL=redis_server.url,
        BENCH_MODEL=str(model),
        PYTHONPATH=str(ROOT),
    )
    settings = Settings.from_env(env)
    client = Client(settings)
    worker = WorkerProcess(
        "caption", env, "caption@bench", tmp / "imageq.log", "--concurrency", str(concurrency)
    ).start()
    bare_log = (tmp / "bare.log").open("wb")
    bare = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.bare_app",
            "worker",
            "-P",
            "threads",
            "-c",
            str(concurrency),
            "-Q",
            "bare",
            "--without-mingle",
            "--without-gossip",
            "-n",
            "bare@bench",
            "-l",
            "WARNING",
        ],
        env=env,
        cwd=ROOT,
        stdout=bare_log,
        stderr=bare_log,
    )
    bare_app = Celery("bench-client", broker=redis_server.url, backend=redis_server.url)
    bare_app.conf.update(task_serializer="json", accept_content=["json"])
    try:
        worker.wait_ready(connect(redis_server.url), client.store.keys.worker("caption@bench"))
        uri = image_uri()
        raw_b64 = uri.split(",", 1)[1]

        def imageq_one() -> tuple[float, float]:
            began = time.time()
            job = client.caption(image=uri)
            record = client.wait(job.id, 60)
            seen = time.time()
            assert record.status == "succeeded", record.error
            finished = parse_time(record.finished_at) or seen
            return seen - began, max(0.0, seen - finished)

        def bare_one() -> tuple[float, float]:
            began = time.time()
            result = bare_app.send_task("bare.caption", args=[raw_b64], queue="bare")
            result.get(timeout=60)
            return time.time() - began, 0.0

        # Warm both paths (first calls pay imports and allocator growth).
        wait_until(lambda: _try(bare_one), 120, "bare worker")
        for _ in range(5):
            imageq_one()
            bare_one()

        lat_i, lat_b, notify = [], [], []
        for _ in range(jobs // 2):  # interleaved, so drift hits both alike
            total, lag = imageq_one()
            lat_i.append(total)
            notify.append(lag)
            lat_b.append(bare_one()[0])

        # Throughput: submit every job at once, then collect; the pools cap the parallelism.
        began = time.monotonic()
        pending = [
            bare_app.send_task("bare.caption", args=[raw_b64], queue="bare") for _ in range(jobs)
        ]
        for result in pending:
            result.get(timeout=120)
        tput_b = jobs / (time.monotonic() - began)
        began = time.monotonic()
        submitted = [client.caption(image=uri).id for _ in range(jobs)]
        for job_id in submitted:
            assert client.wait(job_id, 120).status == "succeeded"
        tput_i = jobs / (time.monotonic() - began)

        print(
            f"\nqueue overhead: {jobs // 2} sequential jobs each, then {jobs} submitted "
            f"at once ({concurrency} threads per worker); tiny BLIP on CPU; one Redis"
        )
        print(f"{'':22}{'p50 ms':>10}{'p99 ms':>10}{'jobs/s':>10}")
        for label, lat, tput in (("bare Celery task", lat_b, tput_b), ("imageq", lat_i, tput_i)):
            p50, p99 = pct(lat, 0.5) * 1e3, pct(lat, 0.99) * 1e3
            print(f"{label:22}{p50:10.1f}{p99:10.1f}{tput:10.1f}")
        print(
            f"ratio imageq/bare: p50 {pct(lat_i, 0.5) / pct(lat_b, 0.5):.2f}x, "
            f"p99 {pct(lat_i, 0.99) / pct(lat_b, 0.99):.2f}x, "
            f"throughput {tput_i / tput_b:.2f}x"
        )
        print(
            f"final record -> waiting client: p50 {pct(notify, 0.5) * 1e3:.2f} ms, "
            f"p99 {pct(notify, 0.99) * 1e3:.2f} ms, mean {statistics.mean(notify) * 1e3:.2f} ms"
        )
        # AsyncResults unsubscribe when collected: do it while Redis still answers.
        pending.clear()
        gc.collect()
    finally:
        client.close()
        worker.stop()
        bare.terminate()
        bare.wait(20)
        bare_app.close()
        redis_server.stop()


def _try(fn: Callable[[], object]) -> bool:
    try:
        fn()
        return True
    except Exception:
        return False


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    run(args.jobs, args.concurrency)
