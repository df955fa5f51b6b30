"""Cross-cutting concerns on Celery signals: start-up, shutdown, metrics, the registry."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from celery import signals

from api_client.kinds import JOB_KINDS
from tasks.state import WorkerState
from workers.ops.live_workers import WorkerRegistry
from workers.ops.metrics import Metrics

log = logging.getLogger(__name__)


def connect_signals(state: WorkerState) -> None:
    job_tasks = {spec.task_name for spec in JOB_KINDS.values()}
    started: dict[str, float] = {}
    holder: dict[str, Any] = {}

    @signals.worker_init.connect(weak=False)
    def load_model(**_: Any) -> None:
        try:
            runtime = state.start()
        except Exception as exc:
            # A worker that cannot hold its model must not take jobs: exit with the reason.
            message = f"imageq: cannot start {state.settings.worker_kind} worker: {exc}"
            log.error(message)
            print(message, file=sys.stderr, flush=True)
            os._exit(3)
        metrics = Metrics.maybe_start(state.settings, runtime)
        holder["metrics"] = metrics
        registry = WorkerRegistry(
            runtime.ctx.store,
            runtime.ctx.worker_name,
            {
                "kind": state.settings.worker_kind,
                "device": runtime.device,
                "model": runtime.ctx.model_id,
                "queues": [],
                "model_load_s": runtime.model_load_s,
            },
        )
        holder["registry"] = registry

    @signals.worker_ready.connect(weak=False)
    def announce(sender: Any = None, **_: Any) -> None:
        registry: WorkerRegistry | None = holder.get("registry")
        if registry is None:
            return
        consumer = getattr(sender, "task_consumer", None)
        if consumer is not None:
            registry.info["queues"] = [q.name for q in consumer.queues]
        registry.start()

    @signals.worker_shutdown.connect(weak=False)
    def shutdown(**_: Any) -> None:
        registry: WorkerRegistry | None = holder.get("registry")
        if registry is not None:
            registry.stop()
        state.stop()

    @signals.task_prerun.connect(weak=False)
    def prerun(task_id: str, task: Any, args: Any = (), **_: Any) -> None:
        started[task_id] = time.monotonic()
        registry: WorkerRegistry | None = holder.get("registry")
        if registry is not None and task.name in job_tasks:
            registry.job_started(task_id, task.name.split(".", 1)[1])

    @signals.task_postrun.connect(weak=False)
    def postrun(task_id: str, task: Any, retval: Any = None, **_: Any) -> None:
        began = started.pop(task_id, None)
        registry: WorkerRegistry | None = holder.get("registry")
        if registry is not None and task.name in job_tasks:
            registry.job_finished(task_id)
        metrics: Metrics | None = holder.get("metrics")
        if metrics is not None and task.name in job_tasks and isinstance(retval, dict):
            metrics.job_done(task_id, retval, None if began is None else time.monotonic() - began)
