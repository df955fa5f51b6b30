"""Sustained load: producer processes submit mixed jobs against a small fleet; then every
submitted id must have exactly one final record and one final webhook, with nothing
stuck queued or running. Prints jobs/s and p50/p99 latency (created -> finished).

    python -m bench.load [--producers 4] [--jobs-per-producer 750] [--rate 6]

``--rate`` paces each producer (jobs/s; 0 submits as fast as it can), so the default
offers about 24 jobs/s for about two minutes. The fleet is one caption worker, one
match worker and the webhooks worker on tiny models, its own redis-server and webhook
receiver; ``tests/e2e/test_load.py`` runs a short version of the same check.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imageq.api_client.client import Client
from imageq.api_client.records import RecordStore, connect, parse_time
from imageq.api_client.schemas import FINAL_STATUSES
from imageq.api_client.settings import Settings, process_environment
from imageq.workers.testing.services import Delivery, RedisServer, WebhookReceiver, WorkerProcess

KINDS = ("caption", "caption", "caption", "match", "caption-attention", "caption-two-images")


def _png_uri(seed: int) -> str:
    import base64

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (seed * 37 % 256, seed * 11 % 256, 90)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def job_for(n: int) -> tuple[str, dict[str, Any]]:
    """The n-th job of the mix: mostly single-image captions, some match, attention, pairs."""
    flavour = KINDS[n % len(KINDS)]
    image = _png_uri(n)
    quick = {"max_new_tokens": 8}
    if flavour == "match":
        return "match", {"image": image, "texts": ["a red square", "a dog on a beach"]}
    if flavour == "caption-attention":
        return "caption", {"image": image, "attention": True, "generation": quick}
    if flavour == "caption-two-images":
        return "caption", {"images": [image, _png_uri(n + 1)], "generation": quick}
    return "caption", {"image": image, "generation": quick}


@dataclass(frozen=True)
class Submitted:
    id: str
    kind: str
    producer: int


def _produce(
    settings: Settings, producer: int, count: int, rate: float, webhook_url: str, out: Any
) -> None:
    """One producer process: submits ``count`` jobs, paced at ``rate`` jobs/s if > 0."""
    started = time.monotonic()
    submitted = []
    with Client(settings) as client:
        for i in range(count):
            if rate > 0:
                time.sleep(max(0.0, started + i / rate - time.monotonic()))
            kind, inp = job_for(producer * count + i)
            record = client.submit(kind, inp, webhook=webhook_url, metadata={"producer": producer})
            submitted.append((record.id, kind, producer))
    out.put(submitted)


def produce(
    settings: Settings, producers: int, per_producer: int, rate: float, webhook_url: str
) -> list[Submitted]:
    """Run the producer processes to completion; returns every job they submitted."""
    ctx = multiprocessing.get_context("spawn")
    results: Any = ctx.Queue()
    procs = [
        ctx.Process(target=_produce, args=(settings, p, per_producer, rate, webhook_url, results))
        for p in range(producers)
    ]
    for proc in procs:
        proc.start()
    found: list[Submitted] = []
    for _ in procs:
        found.extend(Submitted(*row) for row in results.get(timeout=3600))
    for proc in procs:
        proc.join(60)
        if proc.exitcode != 0:
            raise RuntimeError(f"producer {proc.name} exited with {proc.exitcode}")
    return found


def await_final(
    store: RecordStore, ids: Sequence[str], timeout_s: float
) -> dict[str, dict[str, Any]]:
    """Poll until every record is final (or the timeout); returns the latest records."""
    deadline = time.monotonic() + timeout_s
    records: dict[str, dict[str, Any]] = {}
    pending = list(ids)
    while pending and time.monotonic() < deadline:
        for start in range(0, len(pending), 500):
            chunk = pending[start : start + 500]
            for job_id, raw in zip(
                chunk, store.redis.mget([store.keys.job(j) for j in chunk]), strict=True
            ):
                if raw is not None:
                    records[job_id] = json.loads(raw)
        pending = [j for j in pending if records.get(j, {}).get("status") not in FINAL_STATUSES]
        if pending:
            time.sleep(0.5)
    return records


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass
class Report:
    jobs: int
    seconds: float
    jobs_per_s: float
    p50_s: float
    p99_s: float
    statuses: dict[str, int]
    by_kind: dict[str, dict[str, float]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"jobs           {self.jobs} in {self.seconds:.1f} s (first created -> last finished)",
            f"throughput     {self.jobs_per_s:.1f} jobs/s",
            f"latency        p50 {self.p50_s * 1000:.0f} ms, p99 {self.p99_s * 1000:.0f} ms",
            f"statuses       {dict(sorted(self.statuses.items()))}",
        ]
        for kind, figures in sorted(self.by_kind.items()):
            out.append(
                f"  {kind:<12} {int(figures['jobs'])} jobs, p50 {figures['p50_s'] * 1000:.0f} ms, "
                f"p99 {figures['p99_s'] * 1000:.0f} ms"
            )
        out.append("problems       " + ("none" if not self.problems else ""))
        out.extend(f"  - {p}" for p in self.problems[:20])
        return out


def check(
    store: RecordStore,
    submitted: Sequence[Submitted],
    records: Mapping[str, dict[str, Any]],
    deliveries: Sequence[Delivery],
    queue_prefix: str,
) -> Report:
    """Every id: one final record, one final webhook; no queue or unacked message left."""
    problems: list[str] = []
    ids = [s.id for s in submitted]
    if len(set(ids)) != len(ids):
        problems.append(f"{len(ids) - len(set(ids))} duplicate ids submitted")
    statuses = Counter(records.get(j, {}).get("status", "missing") for j in ids)
    for status, n in statuses.items():
        if status != "succeeded":
            problems.append(f"{n} job(s) {status}")
    finals: dict[str, list[Delivery]] = {}
    for d in deliveries:
        body = d.json()
        if body["type"] in ("job.succeeded", "job.failed", "job.canceled"):
            finals.setdefault(body["data"]["id"], []).append(d)
    missing = [j for j in ids if j not in finals]
    twice = [j for j, found in finals.items() if len(found) != 1]
    if missing:
        problems.append(f"{len(missing)} job(s) without a final webhook, e.g. {missing[:3]}")
    if twice:
        problems.append(f"{len(twice)} job(s) with several final webhooks, e.g. {twice[:3]}")
    stuck = [
        key
        for key in store.redis.scan_iter(queue_prefix + "*")
        if store.redis.type(key) == "list" and store.redis.llen(key)
    ]
    if stuck:
        problems.append(f"messages left in {stuck}")
    # kombu keeps each delivered, unacknowledged message as [message, exchange, routing key].
    unacked = [
        raw
        for raw in store.redis.hvals("unacked")
        if str(json.loads(raw)[2]).startswith(queue_prefix)
    ]
    if unacked:
        problems.append(f"{len(unacked)} message(s) still unacknowledged")

    latencies: dict[str, list[float]] = {}
    created_all, finished_all = [], []
    for s in submitted:
        record = records.get(s.id) or {}
        created, finished = (
            parse_time(record.get("created_at")),
            parse_time(record.get("finished_at")),
        )
        if created is None or finished is None:
            continue
        created_all.append(created)
        finished_all.append(finished)
        latencies.setdefault(s.kind, []).append(finished - created)
    every = [v for values in latencies.values() for v in values]
    seconds = (max(finished_all) - min(created_all)) if every else float("nan")
    return Report(
        jobs=len(ids),
        seconds=seconds,
        jobs_per_s=len(every) / seconds if every and seconds > 0 else 0.0,
        p50_s=_pct(every, 0.5),
        p99_s=_pct(every, 0.99),
        statuses=dict(statuses),
        by_kind={
            kind: {"jobs": len(v), "p50_s": _pct(v, 0.5), "p99_s": _pct(v, 0.99)}
            for kind, v in latencies.items()
        },
        problems=problems,
    )


def settle_webhooks(
    receiver: WebhookReceiver, path: str, count: int, timeout_s: float, settle_s: float = 2.0
) -> list[Delivery]:
    """Deliveries to ``path`` once ``count`` arrived (or the timeout), and a little
    longer, so that a duplicate would be there too."""
    with contextlib.suppress(TimeoutError):
        receiver.wait_for(lambda d: d.path == path, count=count, timeout_s=timeout_s)
    time.sleep(settle_s)
    return [d for d in list(receiver.deliveries) if d.path == path]


def fleet_env(
    redis_url: str, storage: Path, secret: str, models: Mapping[str, Path]
) -> dict[str, str]:
    env = {k: v for k, v in process_environment().items() if not k.startswith("IMAGEQ_")}
    env.update(
        IMAGEQ_BROKER_URL=redis_url,
        IMAGEQ_STORAGE_URL=f"file://{storage}",
        IMAGEQ_WEBHOOK_SECRET=secret,
        IMAGEQ_ALLOW_PRIVATE_URLS="1",
        IMAGEQ_QUEUE_PREFIX="load-",
        IMAGEQ_WEBHOOK_SCHEDULE_S="0,0.5,1,2,4",
        IMAGEQ_MODEL_CAPTION=str(models["caption"]),
        IMAGEQ_MODEL_MATCH=str(models["match"]),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--jobs-per-producer", type=int, default=750)
    parser.add_argument("--rate", type=float, default=6.0, help="jobs/s per producer; 0: unpaced")
    parser.add_argument("--timeout-s", type=float, default=1800)
    args = parser.parse_args(argv)

    from imageq.api_client.webhooks import new_secret
    from imageq.workers.testing.tiny import build_tiny_caption, build_tiny_match

    tmp = Path(tempfile.mkdtemp(prefix="imageq-load-"))
    server = RedisServer(tmp / "redis").start()
    receiver = WebhookReceiver().start()
    models = {
        "caption": build_tiny_caption(tmp / "tiny-caption"),
        "match": build_tiny_match(tmp / "tiny-match"),
    }
    env = fleet_env(server.url, tmp / "storage", new_secret(), models)
    settings = Settings.from_env(env)
    store = RecordStore(connect(settings.records_redis_url), settings)
    workers = [
        WorkerProcess(kind, env, f"{kind}@load", tmp / "logs" / f"{kind}.log").start()
        for kind in ("webhooks", "caption", "match")
    ]
    try:
        for worker in workers:
            worker.wait_ready(store.redis, store.keys.worker(worker.name), timeout_s=300)
        total = args.producers * args.jobs_per_producer
        print(f"submitting {total} jobs from {args.producers} producers", flush=True)
        submitted = produce(
            settings, args.producers, args.jobs_per_producer, args.rate, receiver.url("/load")
        )
        records = await_final(store, [s.id for s in submitted], args.timeout_s)
        deliveries = settle_webhooks(receiver, "/load", len(submitted), 120)
        report = check(store, submitted, records, deliveries, settings.queue_prefix)
        dead = [w.name for w in workers if not w.alive()]
        if dead:
            report.problems.append(f"workers died: {dead}")
        print("\n".join(report.lines()))
        return 1 if report.problems else 0
    finally:
        for worker in workers:
            worker.stop()
        receiver.stop()
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
