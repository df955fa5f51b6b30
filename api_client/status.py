"""``imageq status``: queues with depths, live workers and what they are doing."""

from __future__ import annotations

import json
from typing import Any

from api_client.client import Client
from api_client.names import WORKER_QUEUES, queue_name
from api_client.queues import queue_depth
from api_client.records import RecordStore


def live_workers(store: RecordStore) -> list[dict[str, Any]]:
    """Workers whose heartbeat key has not expired."""
    out = []
    for key in store.redis.scan_iter(match=store.key("worker", "*"), count=200):
        raw = store.redis.get(key)
        if raw:
            out.append(json.loads(raw))
    return sorted(out, key=lambda w: str(w.get("name")))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def render_status(client: Client) -> str:
    settings = client.settings
    store = client.store
    queues = sorted({q for qs in WORKER_QUEUES.values() for q in qs})
    names = [queue_name(q, settings.queue_prefix) for q in queues]
    q_rows = [[name, str(queue_depth(client.redis, name))] for name in names]
    workers = live_workers(store)
    w_rows = []
    for w in workers:
        current = w.get("current") or {}
        doing = ", ".join(f"{kind}:{job_id[:8]}" for job_id, kind in current.items()) or "idle"
        w_rows.append(
            [
                str(w.get("name")),
                str(w.get("kind")),
                str(w.get("device")),
                doing,
                str(w.get("processed", 0)),
                str(w.get("jobs_per_min", 0)),
            ]
        )
    counts: dict[str, int] = {}
    for record in store.iter_records(1000):
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    recent = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
    return "\n".join(
        [
            "QUEUES",
            _table(["queue", "depth"], q_rows),
            "",
            f"WORKERS ({len(workers)} live)",
            _table(["name", "kind", "device", "current job", "done", "jobs/min"], w_rows),
            "",
            f"RECENT JOBS (last 1000): {recent}",
        ]
    )
