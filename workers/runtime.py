"""Builds what one worker process holds: its warm model, handlers and job runner.

Called once when the worker starts (never at import); a model that cannot load raises
``ModelError`` and the worker exits non-zero with the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from api_client.records import RecordStore, connect
from api_client.settings import Settings
from workers.delivery import WebhookDispatcher
from workers.devices import resolve_device
from workers.lifecycle import Handler, JobRunner, WorkerContext
from workers.storage import open_storage
from workers.webhooks import WebhookEvent

log = logging.getLogger(__name__)

SendWebhook = Callable[[WebhookEvent], None]


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


Built = tuple[dict[str, Handler], list[Callable[[], None]]]
Builder = Callable[[WorkerContext, str], Built]


def _caption(ctx: WorkerContext, device: str) -> Built:
    from workers.batching import Batcher
    from workers.kinds.caption import CaptionHandler
    from workers.predictors.caption import CaptionPredictor

    settings = ctx.settings
    predictor = CaptionPredictor(settings.model_caption, half_precision=settings.half_precision)
    predictor.setup(device)
    batcher = Batcher(predictor, settings.max_batch_images, settings.max_batch_wait_ms)
    batcher.start()
    return {"caption": CaptionHandler(ctx, batcher)}, [batcher.stop]


BUILDERS: dict[str, Builder] = {"caption": _caption}


def register_builder(worker_kind: str, builder: Builder) -> None:
    BUILDERS[worker_kind] = builder


def build_runtime(settings: Settings, send_webhook: SendWebhook) -> Runtime:
    kind = settings.worker_kind
    store = RecordStore(connect(settings.records_redis_url), settings)
    storage = open_storage(settings)
    ctx = WorkerContext(
        settings=settings,
        store=store,
        storage=storage,
        send_webhook=send_webhook,
        worker_name=settings.worker_name or kind,
        model_id=settings.model_for(kind),
    )
    handlers: dict[str, Handler] = {}
    stops: list[Callable[[], None]] = []
    device = "cpu"
    started = time.monotonic()
    if kind in BUILDERS:
        device = resolve_device(settings.device)
        handlers, stops = BUILDERS[kind](ctx, device)
    elif kind != "webhooks":
        raise ValueError(f"unknown worker kind {kind!r}")
    runtime = Runtime(
        settings=settings,
        ctx=ctx,
        runner=JobRunner(ctx, handlers),
        device=device,
        model_load_s=round(time.monotonic() - started, 3),
        on_stop=stops,
    )
    if kind == "webhooks":
        runtime.dispatcher = WebhookDispatcher(store, send_webhook)
        runtime.dispatcher.start()
        runtime.on_stop.append(runtime.dispatcher.stop)
    log.info(
        "worker %s ready on %s (model load %.2f s)", ctx.worker_name, device, runtime.model_load_s
    )
    return runtime
