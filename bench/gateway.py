"""What the HTTP gateway adds to a submit and a read, side by side in one run.

One private ``redis-server``, one gateway process (``imageq gateway``, uvicorn), no
workers (jobs stay queued, so every read of a queued job also finds its queue
position). For ``POST /v1/jobs`` and ``GET /v1/jobs/{id}``:

- latency, one request at a time over a kept-alive connection, against
  ``Client.submit`` / ``Client.get`` straight to Redis in this process;
- throughput of the one gateway process under concurrent connections (a raw
  HTTP/1.1 load generator on asyncio, so the client side costs little CPU).

    python bench/gateway.py [--requests 1000] [--connections 16] [--seconds 5]

Targets (docs/design.md, HTTP gateway): at most +2 ms at p50 on a submit, and at least
500 submits/s from one gateway process.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imageq.api_client.client import Client
from imageq.api_client.records import RecordStore, connect
from imageq.api_client.settings import Settings, process_environment
from imageq.gateway.tokens import TokenStore
from imageq.workers.testing.services import RedisServer, free_port, wait_until

BODY = json.dumps({"kind": "caption", "input": {"image": "https://example.com/cat.jpg"}})


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(call: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        out.append((time.perf_counter() - start) * 1000)
    return out


class Http:
    """One kept-alive connection (http.client: little overhead of its own)."""

    def __init__(self, port: int, token: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.auth = {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, body: str | None = None) -> dict[str, Any]:
        headers = dict(self.auth)
        if body is not None:
            headers["Content-Type"] = "application/json"
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {data[:200]!r}")
        parsed: dict[str, Any] = json.loads(data)
        return parsed


async def _load(port: int, token: str, requests: list[bytes], connections: int) -> float:
    """Send every request over ``connections`` kept-alive sockets; returns requests/s."""
    queue = list(reversed(requests))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while queue:
                writer.write(queue.pop())
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                if status >= 300:
                    raise RuntimeError(f"load: HTTP {status}")
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return len(requests) / (time.perf_counter() - start)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_request(method: str, path: str, token: str, body: str = "") -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return (head + body).encode()


def run(requests: int, connections: int, seconds: float, access_log: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="imageq-bench-gateway-"))
    redis_server = RedisServer(tmp / "redis", appendonly=False).start()
    env = process_environment()
    env = {k: v for k, v in env.items() if not k.startswith("IMAGEQ_")}
    env.update(
        IMAGEQ_BROKER_URL=redis_server.url,
        IMAGEQ_STORAGE_URL=f"file://{tmp / 'storage'}",
        IMAGEQ_QUEUE_PREFIX="bench-",
    )
    settings = Settings.from_env(env)
    redis = connect(settings.records_redis_url)
    # No limits: the bench measures the gateway, not a tenant's rate.
    token = TokenStore(redis, RecordStore(redis, settings)).create("bench", 0, 0)
    port = free_port()
    argv = [sys.executable, "-m", "imageq.api_client.cli", "gateway", "--port", str(port)]
    argv += ["--log-level", "info" if access_log else "warning"]
    log = (tmp / "imageq.gateway.log").open("wb")
    server = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
    client = Client(settings)
    try:
        api = Http(port, token)

        def healthy() -> bool:
            try:
                probe = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                probe.request("GET", "/healthz")
                return probe.getresponse().status == 200
            except OSError:
                return False

        wait_until(healthy, 60, "the gateway")
        # Warm both paths (imports, connection pools, Celery producers, scripts).
        for _ in range(50):
            api.call("POST", "/v1/jobs", BODY)
            client.submit("caption", {"image": "https://example.com/cat.jpg"})

        ids: list[str] = []
        direct_ids: list[str] = []
        gw_submit = timed(lambda: ids.append(api.call("POST", "/v1/jobs", BODY)["id"]), requests)
        direct_submit = timed(
            lambda: direct_ids.append(
                client.submit("caption", {"image": "https://example.com/cat.jpg"}).id
            ),
            requests,
        )
        gw_get = timed(lambda: api.call("GET", f"/v1/jobs/{ids[len(ids) // 2]}"), requests)
        direct_get = timed(lambda: client.get(direct_ids[len(direct_ids) // 2]), requests)

        # Throughput: as many requests as the target rate needs for ``seconds``, at least.
        # The gateway's own CPU time per request says what one core of it can do even
        # when other processes share this machine's cores.
        n = max(int(600 * seconds), requests)
        before = cpu_s(server.pid)
        submit_rps = asyncio.run(
            _load(port, token, [raw_request("POST", "/v1/jobs", token, BODY)] * n, connections)
        )
        submit_cpu_ms = (cpu_s(server.pid) - before) * 1000 / n
        gets = [raw_request("GET", f"/v1/jobs/{ids[i % len(ids)]}", token) for i in range(n)]
        before = cpu_s(server.pid)
        get_rps = asyncio.run(_load(port, token, gets, connections))
        get_cpu_ms = (cpu_s(server.pid) - before) * 1000 / n
        start = time.process_time()
        for _ in range(requests):
            client.submit("caption", {"image": "https://example.com/cat.jpg"})
        client_cpu_ms = (time.process_time() - start) * 1000 / requests
    finally:
        client.close()
        server.terminate()
        server.wait(30)
        redis.close()
        redis_server.stop()

    print(
        f"gateway bench: {requests} sequential requests each, then {n} over {connections} "
        f"connections; access log {'on' if access_log else 'off'}; no workers (jobs queued)"
    )
    print(f"{'':34}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}")
    rows = [
        ("submit  Client.submit -> Redis", direct_submit),
        ("submit  POST /v1/jobs (gateway)", gw_submit),
        ("get     Client.get -> Redis", direct_get),
        ("get     GET /v1/jobs/{id} (gateway)", gw_get),
    ]
    for label, values in rows:
        rate = 1000 * len(values) / sum(values)
        print(f"{label:34}{pct(values, 0.5):9.2f}{pct(values, 0.99):9.2f}{rate:9.0f}")
    added_submit = pct(gw_submit, 0.5) - pct(direct_submit, 0.5)
    added_get = pct(gw_get, 0.5) - pct(direct_get, 0.5)
    print(
        f"gateway adds at p50: submit {added_submit:+.2f} ms "
        f"(x{pct(gw_submit, 0.5) / pct(direct_submit, 0.5):.2f}), get {added_get:+.2f} ms "
        f"(x{pct(gw_get, 0.5) / pct(direct_get, 0.5):.2f})   target: submit <= +2 ms"
    )
    print(
        f"one gateway process, {connections} connections: {submit_rps:.0f} submits/s, "
        f"{get_rps:.0f} gets/s   target: >= 500 submits/s"
    )
    print(
        f"gateway CPU per request: submit {submit_cpu_ms:.2f} ms (one core: "
        f"{1000 / submit_cpu_ms:.0f} submits/s), get {get_cpu_ms:.2f} ms "
        f"({1000 / get_cpu_ms:.0f} gets/s); Client.submit alone: {client_cpu_ms:.2f} ms CPU"
    )
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="sequential requests per row")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput phase length")
    parser.add_argument("--access-log", action="store_true", help="keep uvicorn's access log on")
    args = parser.parse_args()
    run(args.requests, args.connections, args.seconds, args.access_log)


if __name__ == "__main__":
    main()
