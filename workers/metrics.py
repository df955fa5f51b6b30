"""Prometheus metrics of one worker, served on ``IMAGEQ_METRICS_PORT`` when it is set."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from api_client.names import WORKER_QUEUES, queue_name
from api_client.queues import queue_depth
from api_client.settings import Settings
from workers.runtime import Runtime

log = logging.getLogger(__name__)

_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


class Metrics:
    def __init__(self, settings: Settings, runtime: Runtime) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.settings = settings
        self.runtime = runtime
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter(
            "imageq_jobs",
            "Jobs that ended here, by kind and final status",
            ["kind", "status"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "imageq_queue_wait_seconds",
            "Time from submit to start",
            ["kind"],
            buckets=_BUCKETS_S,
            registry=r,
        )
        self.run_time = Histogram(
            "imageq_run_seconds",
            "Time from start to final status",
            ["kind"],
            buckets=_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "imageq_batch_size",
            "Items per forward pass",
            ["kind"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.images = Counter("imageq_images", "Images processed", ["kind"], registry=r)
        load = Gauge("imageq_model_load_seconds", "Model load and warm-up time", registry=r)
        load.set(runtime.model_load_s)
        r.register(_LiveCollector(settings, runtime))

    @classmethod
    def maybe_start(cls, settings: Settings, runtime: Runtime) -> Metrics | None:
        if not settings.metrics_port:
            return None
        from prometheus_client import start_http_server

        metrics = cls(settings, runtime)
        start_http_server(settings.metrics_port, addr="0.0.0.0", registry=metrics.registry)
        log.info("metrics on :%d/metrics", settings.metrics_port)
        return metrics

    def job_done(self, job_id: str, summary: dict[str, Any], task_s: float | None) -> None:
        kind, status = str(summary.get("kind")), str(summary.get("status"))
        metrics = summary.get("metrics") or {}
        self.jobs.labels(kind, status).inc()
        if metrics.get("queue_s") is not None:
            self.queue_wait.labels(kind).observe(float(metrics["queue_s"]))
        run_s = metrics.get("run_s", task_s)
        if run_s is not None:
            self.run_time.labels(kind).observe(float(run_s))
        if metrics.get("batch_size"):
            self.batch_size.labels(kind).observe(float(metrics["batch_size"]))
        if metrics.get("images"):
            self.images.labels(kind).inc(float(metrics["images"]))


class _LiveCollector:
    """Read at scrape time: queue depths (which Flower lacks) and GPU memory."""

    def __init__(self, settings: Settings, runtime: Runtime) -> None:
        self.settings = settings
        self.runtime = runtime

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        depth = GaugeMetricFamily("imageq_queue_depth", "Messages waiting", labels=["queue"])
        redis = self.runtime.ctx.store.redis
        for base in sorted({q for qs in WORKER_QUEUES.values() for q in qs}):
            name = queue_name(base, self.settings.queue_prefix)
            try:
                depth.add_metric([name], queue_depth(redis, name))
            except Exception as exc:  # Redis away: report nothing rather than fail the scrape
                log.debug("queue depth: %s", exc)
        yield depth
        gpu = GaugeMetricFamily("imageq_gpu_memory_bytes", "CUDA memory", labels=["state"])
        if self.runtime.device.startswith("cuda"):
            import torch

            gpu.add_metric(["allocated"], torch.cuda.memory_allocated(self.runtime.device))
            gpu.add_metric(["reserved"], torch.cuda.memory_reserved(self.runtime.device))
        yield gpu
