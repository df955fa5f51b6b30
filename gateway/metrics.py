"""Prometheus metrics of one gateway process: requests by route, method, status, tenant.

Routes are templates (``/v1/jobs/{job_id}``), never raw paths, and tenants are the
names operators gave, so label sets stay bounded. Served on ``IMAGEQ_METRICS_PORT``
(its own listener, as workers do), not on the public port.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self) -> None:
        # A registry of its own: several apps in one process (tests) do not collide.
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "imageq_gateway_requests",
            "HTTP requests answered, by route template, method, status and tenant",
            ["route", "method", "status", "tenant"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "imageq_gateway_request_seconds",
            "Time to answer (to the first byte, for event streams), by route and method",
            ["route", "method"],
            buckets=_BUCKETS_S,
            registry=self.registry,
        )

    def observe(self, route: str, method: str, status: int, tenant: str, seconds: float) -> None:
        self.requests.labels(route, method, str(status), tenant).inc()
        self.latency.labels(route, method).observe(seconds)
