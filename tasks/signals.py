"""Cross-cutting concerns on Celery signals: start-up, shutdown, metrics, the registry."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from celery import signals

from imageq.api_client.kinds import JOB_KINDS
from imageq.tasks.outcome import counted
from imageq.tasks.state import WorkerState
from imageq.workers.ops.launch import batch_pool_size
from imageq.workers.ops.live_workers import WorkerRegistry
from imageq.workers.ops.metrics import Metrics, WorkerView
from imageq.workers.runtime.autobatch import measured
from imageq.workers.runtime.redis_transport import use_in_worker

log = logging.getLogger(__name__)


def reserved_not_started() -> dict[str, int]:
    """Messages this worker took from its queues but has not handed to its pool yet
    (Celery's reserved requests, and those waiting for an ETA or countdown), by queue."""
    from celery.worker import state as worker_state

    for _ in range(3):  # the sets change under us while tasks come and go
        try:
            active = set(worker_state.active_requests)
            waiting = [r for r in list(worker_state.requests.values()) if r not in active]
            break
        except RuntimeError:
            continue
    else:
        return {}
    counts: dict[str, int] = {}
    for request in waiting:
        queue = str((request.delivery_info or {}).get("routing_key") or "")
        if queue:
            counts[queue] = counts.get(queue, 0) + 1
    return counts


def connect_signals(state: WorkerState) -> None:
    job_tasks = {spec.task_name for spec in JOB_KINDS.values()}
    holder: dict[str, Any] = {}

    @signals.celeryd_init.connect(weak=False)
    def worker_transport(conf: Any = None, **_: Any) -> None:
        # Sent by `celery worker` alone, before it connects: Flower keeps kombu's own.
        if conf is not None:
            use_in_worker(conf)

    @signals.worker_init.connect(weak=False)
    def load_model(sender: Any = None, **_: Any) -> None:
        try:
            runtime = state.start()
        except Exception as exc:
            # A worker that cannot hold its model must not take jobs: exit with the reason.
            message = f"imageq: cannot start {state.settings.worker_kind} worker: {exc}"
            log.error(message)
            print(message, file=sys.stderr, flush=True)
            os._exit(3)
        autobatch = measured(runtime.runner.handlers)
        if autobatch is not None and not state.settings.worker_concurrency and sender is not None:
            # Sent before Celery builds its pool and consumer from ``concurrency``: jobs
            # in flight follow the batch size the worker measured, not the default one.
            sender.concurrency = batch_pool_size(autobatch.size)
        view = WorkerView(
            name=runtime.ctx.worker_name,
            kind=state.settings.worker_kind,
            device=runtime.device,
            model=runtime.ctx.model_id,
            model_load_s=runtime.model_load_s,
        )
        metrics = Metrics.maybe_start(state.settings, view)
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
                # What the worker measured at warm-up (`imageq status --json` shows it).
                "batch_tuning": None
                if autobatch is None or autobatch.last is None
                else autobatch.last.describe(),
            },
            reserved=reserved_not_started,
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

    @signals.worker_shutting_down.connect(weak=False)
    def draining(**_: Any) -> None:
        # Sent from the SIGTERM handler, before the warm shutdown waits for running
        # tasks: a fine-tune saves a checkpoint at its next step and hands its job back,
        # so the worker exits within its stop grace period (docker/compose.yaml).
        state.draining()

    @signals.worker_shutdown.connect(weak=False)
    def shutdown(**_: Any) -> None:
        registry: WorkerRegistry | None = holder.get("registry")
        if registry is not None:
            registry.stop()
        state.stop()

    @signals.task_prerun.connect(weak=False)
    def prerun(task_id: str, task: Any, args: Any = (), **_: Any) -> None:
        registry: WorkerRegistry | None = holder.get("registry")
        if registry is not None and task.name in job_tasks:
            registry.job_started(task_id, task.name.split(".", 1)[1])

    @signals.task_postrun.connect(weak=False)
    def postrun(task_id: str, task: Any, **_: Any) -> None:
        if task.name not in job_tasks:
            return
        # The job's final record when this delivery is the one that counts it (once per
        # job, whatever the task's state: tasks/outcome.py). Metrics first, then the
        # registry, which publishes at once so that `imageq status` counts the job.
        record = counted(task)
        metrics: Metrics | None = holder.get("metrics")
        if metrics is not None and record is not None:
            metrics.job_done(record)
        registry: WorkerRegistry | None = holder.get("registry")
        if registry is not None:
            registry.job_finished(task_id, done=record is not None)
