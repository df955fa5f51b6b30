"""``imageq status``: queues with depths and backlogs, live workers and what they are
doing, throughput.

Read-only and cheap: queue lengths from the broker's lists, worker heartbeats from the
registry keys (each carries the messages its worker reserved but has not started), and
the last ``RECENT_LIMIT`` job records for throughput. ``depth``, ``reserved`` and
``backlog`` mean what api_client/queues.py says.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from imageq.api_client.client import Client
from imageq.api_client.errors import ImageqError
from imageq.api_client.kinds import KINDS, all_queues
from imageq.api_client.names import queue_name
from imageq.api_client.queues import live_workers, queue_depth, reserved_by_queue
from imageq.api_client.records import RecordStore, connect, parse_time
from imageq.api_client.schemas import STATUSES, JobRecord

RECENT_LIMIT = 1000
THROUGHPUT_WINDOW_S = 300.0


__all__ = ["format_status", "live_workers", "queue_depths", "render_status", "snapshot"]


def queue_depths(client: Client) -> list[dict[str, Any]]:
    """Every imageq queue with its depth, read from the broker that holds it."""
    settings = client.settings
    connections: dict[str, redis.Redis] = {}
    out = []
    try:
        for base in sorted(all_queues()):
            # Finetune may live on its own Redis database (IMAGEQ_FINETUNE_BROKER_URL).
            url = settings.long_broker_url if base == "finetune" else settings.broker_url
            if url not in connections:
                connections[url] = connect(url)
            name = queue_name(base, settings.queue_prefix)
            out.append({"queue": name, "depth": queue_depth(connections[url], name)})
    finally:
        for connection in connections.values():
            connection.close()
    return out


def throughput(records: list[JobRecord], now: float, window_s: float) -> list[dict[str, Any]]:
    """Per kind: how many recent jobs are in each status, and finished per minute."""
    by_kind: dict[str, dict[str, Any]] = {}
    for record in records:
        row = by_kind.setdefault(
            record.kind,
            {**{s: 0 for s in STATUSES}, "done_in_window": 0, "run_s": []},
        )
        row[record.status] += 1
        finished = parse_time(record.finished_at)
        if finished is not None and now - finished <= window_s:
            row["done_in_window"] += 1
            run_s = record.metrics.get("run_s")
            if run_s is not None:
                row["run_s"].append(float(run_s))
    out = []
    for kind in sorted(by_kind, key=lambda k: (k not in KINDS, k)):
        row = by_kind[kind]
        runs = sorted(row.pop("run_s"))
        row["kind"] = kind
        row["per_min"] = round(row["done_in_window"] * 60.0 / window_s, 2)
        row["p50_run_s"] = runs[len(runs) // 2] if runs else None
        out.append(row)
    return out


def snapshot(client: Client) -> dict[str, Any]:
    """What ``imageq status`` shows, as data. Raises ``ImageqError`` if Redis is away."""
    store = client.store
    now = time.time()
    try:
        queues = queue_depths(client)
        workers = live_workers(store)
        records = list(store.iter_records(RECENT_LIMIT))
        for worker in workers:
            worker["current_jobs"] = _current_jobs(store, worker)
    except redis.RedisError as exc:
        where = client.settings.public_view()["broker_url"]
        raise ImageqError(f"cannot read status from Redis at {where}: {exc}") from None
    reserved = reserved_by_queue(workers)
    for queue in queues:
        queue["workers"] = sum(1 for w in workers if queue["queue"] in (w.get("queues") or []))
        queue["reserved"] = reserved.get(queue["queue"], 0)
        queue["backlog"] = queue["depth"] + queue["reserved"]
    return {
        "queues": queues,
        "workers": workers,
        "throughput": throughput(records, now, THROUGHPUT_WINDOW_S),
        "recent": len(records),
        "now": now,
    }


def _current_jobs(store: RecordStore, worker: dict[str, Any]) -> list[dict[str, Any]]:
    current: dict[str, str] = worker.get("current") or {}
    jobs = []
    for job_id, kind in sorted(current.items()):
        record = store.get(job_id)
        jobs.append({"id": job_id, "kind": kind, "progress": record and record.progress})
    return jobs


def _table(headers: list[str], rows: list[list[str]], empty: str = "(none)") -> str:
    if not rows:
        return "  " + empty
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _doing(jobs: list[dict[str, Any]]) -> str:
    if not jobs:
        return "idle"
    parts = []
    for job in jobs[:3]:
        text = f"{job['kind']} {job['id']}"
        progress = job.get("progress") or {}
        if progress.get("total"):
            text += f" ({progress.get('step', 0)}/{progress['total']})"
        parts.append(text)
    if len(jobs) > 3:
        parts.append(f"+{len(jobs) - 3} more")
    return ", ".join(parts)


def _age(seen_at: Any, now: float) -> str:
    seen = parse_time(seen_at) if isinstance(seen_at, str) else None
    return "?" if seen is None else f"{max(0.0, now - seen):.0f}s"


def format_status(snap: dict[str, Any]) -> str:
    now = float(snap["now"])
    q_rows = [
        [q["queue"], str(q["depth"]), str(q["reserved"]), str(q["backlog"]), str(q["workers"])]
        for q in snap["queues"]
    ]
    w_rows = [
        [
            str(w.get("name")),
            str(w.get("kind")),
            str(w.get("device")),
            _doing(w.get("current_jobs") or []),
            str(w.get("processed", 0)),
            str(w.get("jobs_per_min", 0)),
            _age(w.get("seen_at"), now),
        ]
        for w in snap["workers"]
    ]
    t_rows = [
        [
            t["kind"],
            *(str(t[s]) for s in STATUSES),
            f"{t['per_min']:g}",
            "-" if t["p50_run_s"] is None else f"{t['p50_run_s']:.2f}",
        ]
        for t in snap["throughput"]
    ]
    window_min = THROUGHPUT_WINDOW_S / 60
    return "\n".join(
        [
            "QUEUES",
            _table(["queue", "depth", "reserved", "backlog", "workers"], q_rows),
            "",
            f"WORKERS ({len(snap['workers'])} live)",
            _table(
                ["name", "kind", "device", "current job", "done", "jobs/min", "seen"],
                w_rows,
                "(no live workers)",
            ),
            "",
            f"THROUGHPUT (last {snap['recent']} jobs; done/min over {window_min:g} min)",
            _table(["kind", *STATUSES, "done/min", "p50 run s"], t_rows, "(no recent jobs)"),
        ]
    )


def render_status(client: Client) -> str:
    return format_status(snapshot(client))
