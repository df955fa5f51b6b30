"""Starts worker processes: ``imageq worker KIND`` runs Celery on ``imageq.tasks.app`` by path.

This module never imports ``tasks``: Celery imports it by name in the process it starts,
so the import direction stays ``tasks -> workers``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from imageq.api_client.kinds import WORKER_KIND_SPECS
from imageq.api_client.names import WORKER_QUEUES, queue_name
from imageq.api_client.settings import Settings
from imageq.workers.ops.devices import is_cuda, node_suffix, pin_cuda


@dataclass(frozen=True)
class WorkerSpec:
    kind: str
    device: str = "auto"
    name: str = ""
    queues: tuple[str, ...] = ()
    concurrency: int = 0
    loglevel: str = "INFO"

    def node_name(self) -> str:
        if self.name:
            return self.name
        if self.kind == "webhooks":
            return "webhooks@%h"
        if is_cuda(self.device):
            # The operator's numbering, also when CUDA_VISIBLE_DEVICES renumbers it inside.
            return f"{self.kind}@{node_suffix(self.device)}"
        return f"{self.kind}@%h"

    def queue_names(self, settings: Settings) -> list[str]:
        bases = self.queues or WORKER_QUEUES[self.kind]
        return [queue_name(q, settings.queue_prefix) for q in bases]

    def pool_size(self, settings: Settings) -> int:
        in_flight = WORKER_KIND_SPECS[self.kind].in_flight
        if in_flight == "one":
            return 1  # a fine-tune has its device to itself, whatever the overrides say
        if self.concurrency or settings.worker_concurrency:
            return self.concurrency or settings.worker_concurrency
        if in_flight == "batch":
            # Until the worker has measured its batch size (workers.runtime.autobatch),
            # which then resizes the pool before it starts (tasks/signals.py).
            return batch_pool_size(settings.max_batch_images)
        if in_flight == "pipeline":
            # One pipeline call at a time runs; the others fetch their images meanwhile
            # and wait, so compatible generate jobs can share the next call.
            return max(2, settings.diffusion_concurrency)
        if in_flight == "io":
            return 8
        return 1


def batch_pool_size(max_batch_images: int) -> int:
    """Jobs in flight for a batching worker: two batches' worth, one in the model and the
    next one fetching its images and waiting in the batcher, so a full batch is ready the
    moment the model frees up (docs/performance.md). Prefetch stays 1: no job waits
    unstarted here."""
    return 2 * max(1, max_batch_images)


def celery_argv(spec: WorkerSpec, settings: Settings) -> list[str]:
    # Every kind runs on a thread pool sized by what it keeps in flight: batching kinds
    # many jobs, a fine-tune one (so a deploy never strands more than one). Not Celery's
    # solo pool: there a job runs inside the consumer's event loop, which then stops
    # (no worker heartbeats for Flower during an hours-long run, no remote control),
    # and the same training steps ran 20-25% slower (bench/finetune.py: 0.75-0.77x the
    # bare loop on solo, 0.98x on one thread).
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "imageq.tasks.app",
        "worker",
        "-Q",
        ",".join(spec.queue_names(settings)),
        "-P",
        "threads",
        "-n",
        spec.node_name(),
        "-E",
        "--without-mingle",
        "--without-gossip",
        "-l",
        spec.loglevel,
    ]
    return [*argv, "-c", str(spec.pool_size(settings))]


def worker_env(spec: WorkerSpec, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of the Celery process: what it is, on which device.

    A ``cuda:N`` worker sees only that GPU (``CUDA_VISIBLE_DEVICES``), as ``cuda:0``, so
    no library in it can open a context on another worker's GPU. ``ValueError`` if N is
    not a GPU this process may use.
    """
    device, env = pin_cuda(spec.device, base)
    env["IMAGEQ_WORKER_KIND"] = spec.kind
    env["IMAGEQ_DEVICE"] = device
    env["IMAGEQ_WORKER_NAME"] = spec.node_name().replace("%h", _hostname())
    if spec.concurrency:
        # The pool size is the user's: the worker must not resize it to its batch size.
        env["IMAGEQ_WORKER_CONCURRENCY"] = str(spec.concurrency)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _hostname() -> str:
    import socket

    return socket.gethostname()


def exec_worker(spec: WorkerSpec, settings: Settings, base_env: Mapping[str, str]) -> None:
    """Replace this process with the Celery worker (signals then reach Celery directly)."""
    if spec.kind not in WORKER_QUEUES:
        raise SystemExit(f"imageq: unknown worker kind {spec.kind!r}")
    try:
        argv = celery_argv(spec, settings)
        env = worker_env(spec, base_env)
    except ValueError as exc:
        raise SystemExit(f"imageq: {exc}") from None
    os.execve(sys.executable, argv, env)
