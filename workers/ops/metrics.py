"""Prometheus metrics of one worker, served on ``IMAGEQ_METRICS_PORT`` when it is set.

Counters and histograms move as jobs end on this worker (``job_done``, called from the
``task_postrun`` signal with the job's final record, once per job across the fleet).
Queue depths, backlogs and GPU memory are read at scrape time, so they are current even
when the worker is idle. Every worker reports every queue's depth and backlog:
aggregate with ``max by (queue)``, not ``sum``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from imageq.api_client.names import WORKER_QUEUES, queue_name
from imageq.api_client.queues import live_workers, queue_depth, reserved_by_queue
from imageq.api_client.records import RecordStore
from imageq.api_client.schemas import JobRecord
from imageq.api_client.settings import Settings
from imageq.api_client.usage import usage_tenant

log = logging.getLogger(__name__)

_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# A scrape must not hang on a Redis that is away: Prometheus would mark the target down.
_SCRAPE_REDIS_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class WorkerView:
    """What the metrics say of the worker they run in (not the worker's runtime itself)."""

    name: str
    kind: str
    device: str
    model: str
    model_load_s: float


class Metrics:
    def __init__(self, settings: Settings, runtime: WorkerView) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.settings = settings
        self.runtime = runtime
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter(
            "imageq_jobs",
            "Jobs that ended on this worker, by kind and final status",
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
            "Items in the forward pass each finished job ran in (observed once per job)",
            ["kind"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        # A counter, not a rate: rate(imageq_images_total[1m]) is images per second.
        self.images = Counter(
            "imageq_images", "Images processed by finished jobs", ["kind"], registry=r
        )
        # Usage by tenant (api_client/usage.py): model seconds of the jobs counted here;
        # jobs without a gateway tenant under "-".
        self.tenant_model_s = Counter(
            "imageq_tenant_model_seconds",
            "Seconds the model worked for finished jobs, by tenant and kind",
            ["tenant", "kind"],
            registry=r,
        )
        load = Gauge("imageq_model_load_seconds", "Model load and warm-up time", registry=r)
        load.set(runtime.model_load_s)
        info = Info("imageq_worker", "What this worker is and where it runs", registry=r)
        info.info(
            {
                "name": runtime.name,
                "kind": runtime.kind,
                "device": runtime.device,
                "model": runtime.model,
            }
        )
        r.register(_LiveCollector(settings, runtime))

    @classmethod
    def maybe_start(cls, settings: Settings, runtime: WorkerView) -> Metrics | None:
        """Serve metrics if ``IMAGEQ_METRICS_PORT`` is set; a busy port is logged, not fatal."""
        if not settings.metrics_port:
            return None
        from prometheus_client import start_http_server

        metrics = cls(settings, runtime)
        try:
            start_http_server(
                settings.metrics_port, addr=settings.metrics_address, registry=metrics.registry
            )
        except OSError as exc:
            # The worker is worth more than its metrics: keep serving jobs, say why loudly.
            log.error(
                "metrics: cannot listen on %s:%d (%s); running without metrics",
                settings.metrics_address,
                settings.metrics_port,
                exc,
            )
            return None
        log.info("metrics on %s:%d/metrics", settings.metrics_address, settings.metrics_port)
        return metrics

    def job_done(self, record: JobRecord) -> None:
        """Count a job that ended (its final record); called once per job."""
        kind, status = record.kind, str(record.status)
        metrics = record.metrics
        self.jobs.labels(kind, status).inc()
        if metrics.get("queue_s") is not None:
            self.queue_wait.labels(kind).observe(float(metrics["queue_s"]))
        # A job that never started (canceled while queued, refused) has no run time.
        if metrics.get("run_s") is not None:
            self.run_time.labels(kind).observe(float(metrics["run_s"]))
        if metrics.get("batch_size"):
            self.batch_size.labels(kind).observe(float(metrics["batch_size"]))
        if metrics.get("images"):
            self.images.labels(kind).inc(float(metrics["images"]))
        self.tenant_model_s.labels(usage_tenant(record), kind).inc(
            float(metrics.get("model_s") or 0.0)
        )


def _scrape_connection(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=_SCRAPE_REDIS_TIMEOUT_S,
        socket_connect_timeout=_SCRAPE_REDIS_TIMEOUT_S,
    )


def broker_queues(settings: Settings) -> dict[str, list[str]]:
    """Queue names by the broker URL that holds them (finetune may have its own)."""
    out: dict[str, list[str]] = {}
    for base in sorted({q for qs in WORKER_QUEUES.values() for q in qs}):
        url = settings.long_broker_url if base == "finetune" else settings.broker_url
        out.setdefault(url, []).append(queue_name(base, settings.queue_prefix))
    return out


class _LiveCollector:
    """Read at scrape time: queue depths and backlogs (which Flower lacks), GPU memory."""

    def __init__(self, settings: Settings, runtime: WorkerView) -> None:
        self.settings = settings
        self.runtime = runtime
        # The broker, not the records store: a deployment may keep them apart.
        self._brokers = {url: _scrape_connection(url) for url in broker_queues(settings)}
        # Worker heartbeats (with what each worker reserved) live beside the records.
        self._records = RecordStore(_scrape_connection(settings.records_redis_url), settings)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        depth = GaugeMetricFamily(
            "imageq_queue_depth", "Messages waiting in the broker, all priorities", labels=["queue"]
        )
        backlog = GaugeMetricFamily(
            "imageq_queue_backlog",
            "Messages no worker has started: waiting in the broker (all priorities) plus "
            "reserved by a live worker but not started",
            labels=["queue"],
        )
        try:
            reserved: dict[str, int] | None = reserved_by_queue(live_workers(self._records))
        except redis.RedisError as exc:  # Redis away: no backlog series
            log.debug("reserved messages: %s", exc)
            reserved = None
        for url, names in broker_queues(self.settings).items():
            for name in names:
                try:
                    waiting = queue_depth(self._brokers[url], name)
                except redis.RedisError as exc:  # Redis away: leave the series out
                    log.debug("queue depth of %s: %s", name, exc)
                    continue
                depth.add_metric([name], waiting)
                if reserved is not None:
                    backlog.add_metric([name], waiting + reserved.get(name, 0))
        yield depth
        yield backlog
        yield self._gpu_memory(GaugeMetricFamily)

    def _gpu_memory(self, family: Any) -> Any:
        gpu = family(
            "imageq_gpu_memory_bytes",
            "CUDA memory of this worker's device: allocated (in use by tensors), "
            "reserved (held by the caching allocator), total (the device's)",
            labels=["device", "state"],
        )
        device = self.runtime.device
        if not device.startswith("cuda"):
            return gpu
        import torch

        try:
            gpu.add_metric([device, "allocated"], torch.cuda.memory_allocated(device))
            gpu.add_metric([device, "reserved"], torch.cuda.memory_reserved(device))
            gpu.add_metric([device, "total"], torch.cuda.get_device_properties(device).total_memory)
        except RuntimeError as exc:  # a device in a bad state: the scrape still answers
            log.warning("gpu memory: %s", exc)
        return gpu
