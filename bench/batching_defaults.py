"""imageq with its defaults against the bare model at its best batch size and against a
naive Celery worker, in one run (``python -m bench.batching --defaults``).

- imageq: one caption worker started with no batch setting at all, so it measures its
  own batch size at warm-up (``imageq.workers.runtime.autobatch``) and sizes its pool from it;
- bare: the same predictor in a process of its own, first at batch 1, 2, 4, ... to find
  its best size (the knee of this device's curve, found by hand), then at that size;
- naive: a Celery worker that captions one image per task, one task at a time (the
  model is one call at a time in imageq too), ``bench/bare_app.py``.

Each round fills a paused queue with ``--jobs`` single-image jobs and resumes it; a
rate runs from the first model call's start to the last one's finish (job records, the
naive task's own timestamps), so start-up and submits are in neither. The best of the
rounds counts for each: other load on a shared machine only ever slows one down.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.caption_models import Bare, Model, photo_jpeg
from imageq.api_client.client import Client
from imageq.api_client.records import parse_time
from imageq.api_client.settings import Settings
from imageq.workers.testing.services import RedisServer, WorkerProcess

NAIVE, NAIVE_QUEUE = "naive@bench", "naive-caption"
IMAGEQ = "caption-defaults@bench"


class Naive:
    """``celery -A bench.bare_app`` with the model, one task at a time."""

    def __init__(self, model: Model, env: dict[str, str], tmp: Path, root: Path) -> None:
        from celery import Celery

        self.log = (tmp / "naive.log").open("wb")
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "bench.bare_app", "worker"),
                *("-P", "threads", "-c", "1", "-Q", NAIVE_QUEUE, "-n", NAIVE),
                *("--without-mingle", "--without-gossip", "-l", "WARNING"),
            ],
            env={**env, **model.env(), "BENCH_MODEL": str(model.path)},
            cwd=root,
            stdout=self.log,
            stderr=self.log,
        )
        self.app = Celery("bench-naive", broker=env["BENCH_BROKER_URL"], set_as_current=False)
        self.app.conf.update(
            task_serializer="json", accept_content=["json"], result_backend=env["BENCH_BROKER_URL"]
        )

    def _consume(self, on: bool) -> bool:
        call = self.app.control.add_consumer if on else self.app.control.cancel_consumer
        return bool(call(NAIVE_QUEUE, destination=[NAIVE], reply=True, timeout=10))

    def ready(self, timeout_s: float = 900) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._consume(True):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the naive worker did not start")
            time.sleep(1)

    def rate(self, b64: str, jobs: int, tokens: int) -> float:
        self._consume(False)
        results = [
            self.app.send_task("bare.caption_timed", args=[b64, tokens], queue=NAIVE_QUEUE)
            for _ in range(jobs)
        ]
        self._consume(True)
        done: list[dict[str, Any]] = [r.get(timeout=3600) for r in results]
        return jobs / (max(d["finished"] for d in done) - min(d["started"] for d in done))

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self.log.close()
        self.app.close()


def queue_rate(client: Client, control: Any, uri: str, jobs: int, tokens: int) -> tuple[float, int]:
    queue = client.settings.queue_prefix + "caption"
    control.control.cancel_consumer(queue, destination=[IMAGEQ], reply=True, timeout=10)
    generation = {"max_new_tokens": tokens, "min_new_tokens": tokens}
    ids = [client.caption(image=uri, generation=generation).id for _ in range(jobs)]
    control.control.add_consumer(queue, destination=[IMAGEQ], reply=True, timeout=10)
    records = [client.wait(job_id, 3600) for job_id in ids]
    bad = [r for r in records if r.status != "succeeded"]
    if bad:
        raise RuntimeError(f"job {bad[0].id} {bad[0].status}: {bad[0].error}")
    starts = [parse_time(r.started_at) or 0.0 for r in records]
    ends = [parse_time(r.finished_at) or 0.0 for r in records]
    return jobs / (max(ends) - min(starts)), max(int(r.metrics["batch_size"]) for r in records)


def best_bare_size(bare: Bare, sizes: list[int], minimum: int) -> tuple[int, dict[int, float]]:
    rates = {size: bare.rate(size, max(size, minimum)) for size in sizes}
    return max(rates, key=lambda size: rates[size]), rates


def run_defaults(args: argparse.Namespace, path: Path, env: dict[str, str], tmp: Path) -> int:
    from celery import Celery

    from imageq.api_client.celery_config import celery_config

    root = Path(__file__).resolve().parent.parent
    redis_server = RedisServer(tmp / "redis", appendonly=False).start()
    dtype = (args.dtypes or "auto").split(",")[0]
    model = Model(path, args.device, dtype, args.threads, args.tokens)
    wenv = {
        **env,
        **model.env(),
        "IMAGEQ_BROKER_URL": redis_server.url,
        "IMAGEQ_MODEL_CAPTION": str(path),
        "IMAGEQ_STORAGE_URL": f"file://{tmp / 'storage'}",
        "IMAGEQ_QUEUE_PREFIX": "defaults-",
        "BENCH_BROKER_URL": redis_server.url,
    }
    # Defaults means defaults: nothing about batching is set for the imageq worker.
    for name in ("IMAGEQ_MAX_BATCH_IMAGES", "IMAGEQ_BATCH_TUNING", "IMAGEQ_WORKER_CONCURRENCY"):
        wenv.pop(name, None)
    settings = Settings.from_env(wenv)
    client = Client(settings)
    control = Celery("bench-control", set_as_current=False)
    control.conf.update(celery_config(settings))
    worker = WorkerProcess(
        "caption", wenv, IMAGEQ, tmp / "imageq.log", "--device", args.device
    ).start()
    naive = Naive(model, wenv, tmp, root)
    bare = Bare(model, wenv)
    uri_bytes = photo_jpeg()
    b64 = base64.b64encode(uri_bytes).decode()
    uri = "data:image/jpeg;base64," + b64
    sizes = [int(s) for s in args.bare_sizes.split(",")]
    try:
        began = time.monotonic()
        key = client.store.keys.worker(IMAGEQ)
        worker.wait_ready(client.redis, key, timeout_s=1800)
        tuned = json.loads(client.redis.get(key) or "{}").get("batch_tuning") or "not measured"
        print(f"  imageq worker measured: {tuned}", flush=True)
        print(
            f"  imageq worker ready (with its batch size measured) in "
            f"{time.monotonic() - began:.0f} s",
            flush=True,
        )
        naive.ready()
        print("  finding the bare model's best batch size ...", flush=True)
        best_size, curve = best_bare_size(bare, sizes, args.min_round_images)
        print(
            "  bare images/s by batch size: "
            + ", ".join(f"{s}: {r:.3f}" for s, r in curve.items()),
            flush=True,
        )
        # Warm each path once (allocator growth, first calls).
        queue_rate(client, control, uri, 1, args.tokens)
        naive.rate(b64, 1, args.tokens)
        results: dict[str, float] = {}
        batch = 0
        for r in range(args.rounds):
            print(f"  round {r + 1}/{args.rounds}: {args.jobs} single-image jobs each", flush=True)
            rate, batch = queue_rate(client, control, uri, args.jobs, args.tokens)
            results["imageq"] = max(results.get("imageq", 0.0), rate)
            results["naive"] = max(
                results.get("naive", 0.0), naive.rate(b64, args.jobs, args.tokens)
            )
            results["bare"] = max(results.get("bare", 0.0), bare.rate(best_size, args.jobs))
    finally:
        bare.close()
        naive.close()
        worker.stop()
        client.close()
        control.close()
        redis_server.stop()
    print(
        f"\nBLIP-{args.model} (random weights) on {args.device}, {args.tokens}-token captions, "
        f"{args.jobs} single-image jobs, {args.threads} torch thread(s) per process, "
        f"best of {args.rounds} rounds; images/s"
    )
    rows = (
        (f"imageq, defaults (largest pass {batch})", results["imageq"]),
        (f"bare model at its best batch size ({best_size})", results["bare"]),
        ("naive Celery worker (one image per task)", results["naive"]),
    )
    for label, value in rows:
        print(f"{label:60}{value:10.3f}")
    vs_bare, vs_naive = results["imageq"] / results["bare"], results["imageq"] / results["naive"]
    print(
        f"imageq defaults / bare at its best: {vs_bare:.2f}x  "
        f"[target >= 0.9x: {'ok' if vs_bare >= 0.9 else 'MISSED'}]"
    )
    print(
        f"imageq defaults / naive Celery worker: {vs_naive:.2f}x  "
        f"[target >= 1.3x: {'ok' if vs_naive >= 1.3 else 'MISSED'}]"
    )
    return 0
