"""What the queue adds to a diffusion image: imageq's worker against the bare pipeline.

The same tiny SD checkpoint, on CPU, one thread each: a bare ``StableDiffusionPipeline``
call in this process against a generate job through Redis and a real diffusion worker
(submit -> final record seen by the client, PNG written to storage). Prints the time
per image of each, one job at a time and interleaved so drift hits both alike, their
ratio, and the throughput of many jobs submitted at once (which the worker batches).

    python bench/diffusion_overhead.py [--jobs 20] [--steps 10] [--size 64] [--storage s3|file]

``--storage file`` (the default) writes outputs to a local folder, each write fsynced;
``s3`` to moto's S3 server, started by the bench on the same cores (its own CPU per
request then counts against the job: +13 ms against +6.5 ms for ``file`` in one trial),
so it checks the S3 path rather than measuring S3.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# ``python bench/diffusion_overhead.py`` from a fresh clone: ``bench`` is not an installed
# package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.meters import S3Server
from imageq.api_client.client import Client
from imageq.api_client.records import connect
from imageq.api_client.settings import Settings, process_environment
from imageq.workers.testing.services import RedisServer, WorkerProcess
from imageq.workers.testing.tiny_diffusion import build_tiny_diffusion


def bare_pipeline(model: Path) -> Any:
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(1)  # as the worker runs (OMP_NUM_THREADS=1)
    pipe = StableDiffusionPipeline.from_pretrained(str(model), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(jobs: int, steps: int, size: int, storage: str) -> None:
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="imageq-diffusion-bench-"))
    redis_server = RedisServer(tmp / "redis", appendonly=False).start()
    model = build_tiny_diffusion(tmp / "tiny-sd")
    env = process_environment()
    env.update(
        IMAGEQ_BROKER_URL=redis_server.url,
        IMAGEQ_MODEL_DIFFUSION=str(model),
        IMAGEQ_STORAGE_URL=f"file://{tmp / 'storage'}",
        IMAGEQ_QUEUE_PREFIX="bench-",
        OMP_NUM_THREADS="1",
    )
    s3 = S3Server(tmp / "moto.log").start() if storage == "s3" else None
    if s3 is not None:
        env.update(s3.env())
    settings = Settings.from_env(env)
    client = Client(settings)
    worker = WorkerProcess("diffusion", env, "diffusion@bench", tmp / "worker.log").start()
    try:
        pipe = bare_pipeline(model)
        worker.wait_ready(connect(redis_server.url), client.store.keys.worker("diffusion@bench"))
        fields: dict[str, Any] = {"width": size, "height": size, "steps": steps}

        def bare_one(seed: int) -> float:
            began = time.perf_counter()
            pipe(
                prompt=["a cat"],
                num_inference_steps=steps,
                height=size,
                width=size,
                generator=[torch.Generator().manual_seed(seed)],
            )
            return time.perf_counter() - began

        records: list[Any] = []

        def queue_one(seed: int) -> float:
            began = time.perf_counter()
            record = client.wait(client.generate("a cat", seed=seed, **fields).id, 120)
            assert record.status == "succeeded", record.error
            records.append(record)
            return time.perf_counter() - began

        for seed in range(3):  # first calls pay for allocator growth and lazy imports
            bare_one(seed)
            queue_one(seed)
        bare, queued = [], []
        del records[:]
        for seed in range(jobs):
            bare.append(bare_one(seed))
            queued.append(queue_one(seed))

        # Where a job's time goes, from its record: created -> started (the submit, the
        # broker, Celery, the claim), and its run outside the pipeline call (outputs,
        # result.json, the final record).
        waited = statistics.median(r.metrics["queue_s"] for r in records) * 1e3
        outside = (
            statistics.median(r.metrics["run_s"] - r.metrics["pipeline_s"] for r in records) * 1e3
        )
        began = time.perf_counter()
        ids = [client.generate("a cat", seed=seed, **fields).id for seed in range(jobs)]
        records = [client.wait(job_id, 300) for job_id in ids]
        burst_s = time.perf_counter() - began
        assert all(r.status == "succeeded" for r in records)
        mean_batch = statistics.mean(r.metrics["batch_jobs"] for r in records)

        b50, q50 = statistics.median(bare), statistics.median(queued)
        print(
            f"\ndiffusion overhead: tiny SD, {size}x{size}, {steps} steps, CPU, one thread; "
            f"{jobs} jobs of 1 image each way; storage: {storage}"
        )
        print(f"{'':34}{'p50 ms/image':>14}{'mean ms/image':>15}")
        print(f"{'bare pipeline call':34}{b50 * 1e3:14.1f}{statistics.mean(bare) * 1e3:15.1f}")
        print(
            f"{'imageq job (submit -> final)':34}{q50 * 1e3:14.1f}"
            f"{statistics.mean(queued) * 1e3:15.1f}"
        )
        extra = (q50 - b50) * 1e3
        verdict = "ok" if extra <= 5 else "MISSED"
        print(
            f"ratio imageq/bare (p50): {q50 / b50:.2f}x  (+{extra:.1f} ms a job) "
            f"[target <= 5 ms: {verdict}]"
        )
        print(
            f"  of which (p50, from the records): submit to started {waited:.1f} ms, "
            f"the run outside the pipeline call {outside:.1f} ms, the rest (the client "
            f"hearing of it, the pipeline's own variance) {extra - waited - outside:.1f} ms"
        )
        print(
            f"{jobs} jobs submitted at once: {burst_s / jobs * 1e3:.1f} ms/image, "
            f"{jobs / burst_s:.1f} images/s, mean {mean_batch:.1f} jobs per pipeline call "
            f"({b50 / (burst_s / jobs):.2f}x the bare one-at-a-time rate)"
        )
    finally:
        client.close()
        worker.stop()
        redis_server.stop()
        if s3 is not None:
            s3.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--storage", choices=("s3", "file"), default="file")
    args = parser.parse_args()
    run(args.jobs, args.steps, args.size, args.storage)
