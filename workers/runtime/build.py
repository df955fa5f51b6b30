"""Builds what one worker process holds: its warm model, handlers and job runner.

Called once when the worker starts (never at import); a model that cannot load raises
``ModelError`` and the worker exits non-zero with the reason.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from imageq.api_client.kinds import WORKER_KIND_SPECS
from imageq.api_client.records import RecordStore, connect
from imageq.api_client.settings import Settings
from imageq.workers.io.storage import open_storage
from imageq.workers.ops.devices import resolve_device
from imageq.workers.runtime.failover import FailoverSweeper, SendJob
from imageq.workers.runtime.lifecycle import Built, Handler, JobRunner, WorkerContext
from imageq.workers.webhooks.outbox import WebhookDispatcher
from imageq.workers.webhooks.post import WebhookEvent

log = logging.getLogger(__name__)

SendWebhook = Callable[[WebhookEvent], None]

#: Redis connections one worker process holds at most: its job threads (twice the batch
#: size) take turns, and one stays with the cancel subscription (workers.runtime.leases).
REDIS_CONNECTIONS = 64


@dataclass
class Runtime:
    settings: Settings
    ctx: WorkerContext
    runner: JobRunner
    device: str
    model_load_s: float = 0.0
    dispatcher: WebhookDispatcher | None = None
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    # What Prometheus and ``imageq status`` read: live objects, not copies.
    parts: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> None:
        for stop in reversed(self.on_stop):
            try:
                stop()
            except Exception as exc:
                log.warning("while stopping: %s", exc)


Builder = Callable[[WorkerContext, str], Built]


def load_builder(worker_kind: str) -> Builder:
    """The worker kind's ``build(ctx, device)``, imported only by the worker that needs it,
    so a caption worker never imports diffusers."""
    module_name, func = WORKER_KIND_SPECS[worker_kind].builder.split(":")
    builder: Builder = getattr(importlib.import_module(module_name), func)
    return builder


def build_runtime(
    settings: Settings, send_webhook: SendWebhook, send_job: SendJob | None = None
) -> Runtime:
    """``send_job`` re-sends job documents (hand-back on SIGTERM, failover of a dead
    worker's jobs); without it this worker runs no failover sweeper."""
    kind = settings.worker_kind
    store = RecordStore(connect(settings.records_redis_url, REDIS_CONNECTIONS), settings)
    storage = open_storage(settings)
    ctx = WorkerContext(
        settings=settings,
        store=store,
        storage=storage,
        send_webhook=send_webhook,
        worker_name=settings.worker_name or kind,
        model_id=settings.model_for(kind),
        send_job=send_job,
    )
    handlers: dict[str, Handler] = {}
    stops: list[Callable[[], None]] = []
    device = "cpu"
    started = time.monotonic()
    if kind not in WORKER_KIND_SPECS:
        raise ValueError(f"unknown worker kind {kind!r}")
    if WORKER_KIND_SPECS[kind].builder:
        device = resolve_device(settings.device)
        handlers, stops = load_builder(kind)(ctx, device)
    runtime = Runtime(
        settings=settings,
        ctx=ctx,
        runner=JobRunner(ctx, handlers),
        device=device,
        model_load_s=round(time.monotonic() - started, 3),
        on_stop=stops,
    )
    # Stopped last (on_stop runs in reverse): batchers finish their jobs holding leases.
    runtime.on_stop.insert(0, runtime.runner.close)
    if kind == "webhooks":
        runtime.dispatcher = WebhookDispatcher(store, send_webhook)
        runtime.dispatcher.start()
        runtime.on_stop.append(runtime.dispatcher.stop)
    if send_job is not None:
        # In every worker, so that jobs fail over while any worker of the fleet lives.
        sweeper = FailoverSweeper(
            store,
            send_job,
            runtime.runner.finalize,
            runtime.runner.fail_lost,
            every_s=settings.failover_scan_s,
            worker_name=ctx.worker_name,
        )
        sweeper.start()
        runtime.on_stop.append(sweeper.stop)
    log.info(
        "worker %s ready on %s (model load %.2f s)", ctx.worker_name, device, runtime.model_load_s
    )
    return runtime
