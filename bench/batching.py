"""Micro-batching, measured in one run: batched against one-at-a-time, queue against bare.

For each precision, one caption worker per maximum batch size B (started through the
CLI, ``IMAGEQ_MAX_BATCH_IMAGES=B``, each on its own queue prefix) and one bare process
holding the same predictor stay loaded and warm; then rounds alternate between them.
In a round each worker's consumer is paused, its queue filled, and resumed: its rate
counts from the first job's start to the last one's finish (job records), so neither
the client's submit rate nor start-up is counted. The bare process runs as many images
in ``predict`` calls of B. The best round of each counts: on a shared machine other
load only ever slows a run down. Captions have a fixed length (``min_new_tokens =
max_new_tokens``), so random weights cost what real ones would.

    python -m bench.batching                      # BLIP-base on this CPU, batch 1 vs 8
    python -m bench.batching --device cuda:0 --batches 1,32,128 --dtypes bf16,fp16
    python -m bench.batching --speed-options      # bare model: dtype, channels-last, compile
    python -m bench.batching --defaults           # imageq untuned by hand vs bare best vs naive

(from the repository's root, which ``-m`` puts on the path: the bare model runs as
``python -m bench.caption_models``).

``--model base`` is the full-size BLIP-base captioning architecture with random weights
(``imageq.workers.testing.tiny.blip_base_caption_config``; nothing is downloaded);
``--model tiny`` the tiny test model (measures the queue's own overhead).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.caption_models import Bare, Model
from imageq.api_client.client import Client
from imageq.api_client.records import parse_time
from imageq.api_client.settings import Settings, process_environment
from imageq.workers.testing.services import RedisServer, WorkerProcess

ROOT = Path(__file__).resolve().parent.parent


# -- through the queue -----------------------------------------------------------------


class Queued:
    """A caption worker on its own queue prefix; its consumer is paused between rounds."""

    def __init__(
        self, model: Model, batch: int, concurrency: int, env: dict[str, str], tmp: Path
    ) -> None:
        from celery import Celery

        from imageq.api_client.celery_config import celery_config
        from imageq.api_client.names import queue_name

        self.model, self.batch = model, batch
        prefix = f"b{batch}-{model.dtype}-"
        wenv = {
            **env,
            **model.env(),
            "IMAGEQ_MAX_BATCH_IMAGES": str(batch),
            "IMAGEQ_QUEUE_PREFIX": prefix,
        }
        settings = Settings.from_env(wenv)
        self.client = Client(settings)
        self.control = Celery("bench-control", set_as_current=False)
        self.control.conf.update(celery_config(settings))
        self.queue = queue_name("caption", prefix)
        self.name = f"caption-b{batch}-{model.dtype}@bench"
        # A later --device overrides WorkerProcess's default of cpu (argparse keeps the last).
        extra = ["--device", model.device]
        if concurrency:
            extra += ["--concurrency", str(concurrency)]
        self.worker = WorkerProcess("caption", wenv, self.name, tmp / f"{self.name}.log", *extra)
        self.worker.start()

    def ready(self) -> None:
        key = self.client.store.keys.worker(self.name)
        self.worker.wait_ready(self.client.redis, key, timeout_s=900)

    def _submit(self, uri: str, jobs: int, per_job: int) -> list[str]:
        generation = self.model.generation()
        return [
            self.client.caption(images=[uri] * per_job, generation=generation).id
            for _ in range(jobs)
        ]

    def _wait(self, ids: list[str]) -> list[Any]:
        records = [self.client.wait(job_id, 1800) for job_id in ids]
        for record in records:
            if record.status != "succeeded":
                log = self.worker.log_path.read_text()[-3000:]
                raise RuntimeError(f"job {record.id} {record.status}: {record.error}\n{log}")
        return records

    def warm(self, uri: str, images: int, per_job: int) -> None:
        self._wait(self._submit(uri, max(1, -(-images // per_job)), per_job))

    def rate(self, uri: str, images: int, per_job: int) -> tuple[float, list[int]]:
        paused = self.control.control.cancel_consumer(
            self.queue, destination=[self.name], reply=True, timeout=10
        )
        if not paused:
            raise RuntimeError(f"worker {self.name} did not answer cancel_consumer")
        ids = self._submit(uri, max(1, images // per_job), per_job)
        self.control.control.add_consumer(
            self.queue, destination=[self.name], reply=True, timeout=10
        )
        records = self._wait(ids)
        starts = [parse_time(r.started_at) or 0.0 for r in records]
        ends = [parse_time(r.finished_at) or 0.0 for r in records]
        rate = len(records) * per_job / (max(ends) - min(starts))
        return rate, [int(r.metrics["batch_size"]) for r in records]

    def close(self) -> None:
        self.worker.stop()
        self.client.close()
        self.control.close()


# -- the report ------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _verdict(value: float, target: float, show: bool = True) -> str:
    return f"[target >= {target}x: {'ok' if value >= target else 'MISSED'}]" if show else ""


class Report:
    def __init__(self, title: str, targets: bool = True) -> None:
        self.title = title
        # The targets are about BLIP-base; the tiny model only checks the plumbing.
        self.targets = targets
        self.rows: list[dict[str, Any]] = []

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def print_batching(self, batches: list[int]) -> None:
        print(f"\n{self.title}; images/s")
        print(f"{'dtype':6}{'batch':>6}{'queue':>10}{'bare':>10}{'queue/bare':>12}  batch sizes")
        for r in self.rows:
            sizes = r["sizes"]
            seen = f"{min(sizes)}..{max(sizes)}, mean {sum(sizes) / len(sizes):.1f}"
            ratio = r["queue"] / r["bare"]
            print(
                f"{r['dtype']:6}{r['batch']:>6}{r['queue']:>10.3f}{r['bare']:>10.3f}"
                f"{ratio:>11.2f}x  {seen}"
            )
        one, top = batches[0], batches[-1]
        for dtype in dict.fromkeys(r["dtype"] for r in self.rows):
            by = {r["batch"]: r for r in self.rows if r["dtype"] == dtype}
            for batch in batches[1:]:
                gain = by[batch]["queue"] / by[one]["queue"]
                verdict = _verdict(gain, 1.3, self.targets and batch == top)
                print(
                    f"{dtype}: micro-batched ({batch}) / one-at-a-time ({one}) through the "
                    f"queue: {gain:.2f}x  {verdict}".rstrip()
                )
            ratio = by[top]["queue"] / by[top]["bare"]
            verdict = _verdict(ratio, 0.9, self.targets)
            print(f"{dtype}: queue / bare at batch {top}: {ratio:.2f}x  {verdict}".rstrip())

    def print_speed(self) -> None:
        print(f"\n{self.title}; bare model, images/s")
        base = self.rows[0]["bare"]
        for r in self.rows:
            print(f"{r['label']:28}{r['bare']:>10.3f}{r['bare'] / base:>9.2f}x")


def speed_options(
    report: Report, args: argparse.Namespace, path: Path, env: dict[str, str], batch: int
) -> None:
    """Each speed setting alone against the default precision, bare, at one batch size."""
    plain = "fp16" if args.device.startswith("cuda") else "fp32"
    base = Model(path, args.device, plain, args.threads, args.tokens)
    variants = {
        f"{plain} (default)": base,
        "bf16": replace(base, dtype="bf16"),
        f"{plain} + channels_last": replace(base, channels_last=True),
        f"{plain} + torch.compile": replace(base, torch_compile=True),
    }
    images = _round_images(args, batch)
    bares = {label: Bare(model, env) for label, model in variants.items()}
    try:
        for bare in bares.values():
            # Compiled graphs (and GPUs) pay for a new batch size once.
            bare.rate(batch, batch)
        best: dict[str, float] = {}
        for r in range(args.rounds):
            print(f"  round {r + 1}: {images} images each", flush=True)
            for label, bare in bares.items():
                best[label] = max(best.get(label, 0.0), bare.rate(batch, images))
    finally:
        for bare in bares.values():
            bare.close()
    for label, rate in best.items():
        report.add(label=label, batch=batch, bare=rate)
    report.print_speed()


def _round_images(args: argparse.Namespace, batch: int) -> int:
    images = max(batch * args.round_batches, args.min_round_images)
    return max(args.images_per_job, images - images % args.images_per_job)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("base", "tiny"), default="base")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    parser.add_argument(
        "--dtypes", help="auto,fp32,fp16,bf16 (default: fp32 on cpu, else bf16,fp16)"
    )
    parser.add_argument("--batches", default="1,8", help="maximum batch sizes to compare")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds; the best counts")
    parser.add_argument("--round-batches", type=int, default=2, help="full batches per round")
    parser.add_argument("--min-round-images", type=int, default=2, help="images per round, min")
    parser.add_argument("--images-per-job", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=20, help="caption length (fixed)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per model process (2 cores: 1)"
    )
    parser.add_argument(
        "--concurrency-factor",
        type=float,
        default=0,
        help="worker jobs in flight = this x the batch size (default: the launcher's choice)",
    )
    parser.add_argument("--speed-options", action="store_true", help="bare model: each option")
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="imageq with no batch setting vs the bare model at its best size vs a naive worker",
    )
    parser.add_argument("--jobs", type=int, default=24, help="--defaults: jobs per round")
    parser.add_argument(
        "--bare-sizes", default="1,2,4,8,16", help="--defaults: bare batch sizes to search"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="imageq-bench-batching-"))
    try:
        return run(args, tmp)
    finally:
        # The base model alone is 900 MB.
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, tmp: Path) -> int:
    began = time.monotonic()
    from bench.caption_models import build_model, photo_jpeg

    print(f"building the {args.model} model in {tmp} ...", flush=True)
    path = build_model(args.model, tmp / "model")
    env = process_environment()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cuda = args.device.startswith("cuda")
    dtypes = (args.dtypes or ("bf16,fp16" if cuda else "fp32")).split(",")
    batches = _ints(args.batches)
    report = Report(
        f"BLIP-{args.model} (random weights) on {args.device}, {args.tokens}-token captions, "
        f"{args.images_per_job} image(s) per job, {args.threads} torch thread(s) per process, "
        f"best of {args.rounds} rounds",
        targets=args.model == "base",
    )
    if args.defaults:
        from bench.batching_defaults import run_defaults

        run_defaults(args, path, env, tmp)
    elif args.speed_options:
        speed_options(report, args, path, env, batches[-1])
    else:
        redis_server = RedisServer(tmp / "redis", appendonly=False).start()
        env.update(
            IMAGEQ_BROKER_URL=redis_server.url,
            IMAGEQ_MODEL_CAPTION=str(path),
            IMAGEQ_STORAGE_URL=f"file://{tmp / 'storage'}",
        )
        uri = "data:image/jpeg;base64," + base64.b64encode(photo_jpeg()).decode()
        try:
            for dtype in dtypes:
                measure(
                    report,
                    args,
                    Model(path, args.device, dtype, args.threads, args.tokens),
                    batches,
                    env,
                    uri,
                    tmp,
                )
        finally:
            redis_server.stop()
        report.print_batching(batches)
    print(f"(total {time.monotonic() - began:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(report.rows, indent=2))
    return 0


def measure(
    report: Report,
    args: argparse.Namespace,
    model: Model,
    batches: list[int],
    env: dict[str, str],
    uri: str,
    tmp: Path,
) -> None:
    """One precision: a resident worker per batch size and a bare process, in rounds."""
    factor, per_job = args.concurrency_factor, args.images_per_job
    queued = {
        b: Queued(model, b, max(2, round(factor * b)) if factor else 0, env, tmp) for b in batches
    }
    bare = Bare(model, env)
    try:
        for batch, q in queued.items():
            q.ready()
            # GPUs (and compiled graphs) pay for a new batch size once: warm up at full size.
            warm = batch if model.device.startswith("cuda") else 1
            q.warm(uri, warm, per_job)
            bare.rate(batch, warm)
        best: dict[int, tuple[tuple[float, list[int]], float]] = {}
        for r in range(args.rounds):
            for batch, q in queued.items():
                images = _round_images(args, batch)
                print(f"  {model.dtype} batch {batch}: {images} images, round {r + 1}", flush=True)
                rate, sizes = q.rate(uri, images, per_job)
                bare_rate = bare.rate(batch, images)
                old = best.get(batch)
                if old is not None:
                    rate, sizes = max((rate, sizes), old[0], key=lambda q: q[0])
                    bare_rate = max(bare_rate, old[1])
                best[batch] = ((rate, sizes), bare_rate)
    finally:
        bare.close()
        for q in queued.values():
            q.close()
    for batch, ((rate, sizes), bare_rate) in best.items():
        report.add(dtype=model.dtype, batch=batch, queue=rate, bare=bare_rate, sizes=sizes)


if __name__ == "__main__":
    sys.exit(main())
