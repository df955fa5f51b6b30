"""The gateway's HTTP server against raw sockets: a request head that trickles in (a
slowloris) is cut off, a keep-alive connection still serves its next request.

uvicorn alone never times out a head that trickles: its keep-alive timer starts only
after a response and stops at any byte (gateway/server.py).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from imageq.api_client.settings import Settings
from imageq.gateway.server import PROTOCOLS
from imageq.workers.testing.services import RedisServer, free_port, wait_until
from tests.fixtures.gateway import GatewayProcess
from tests.fixtures.services import service_env


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def trickle(port: int, limit_s: float) -> float | None:
    """Send a request head one byte a second; seconds until the server closed the
    connection (None: still open after ``limit_s``)."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 100
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        for byte in head:
            if time.monotonic() - started > limit_s:
                return None
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1024) == b"":
                    return time.monotonic() - started
            except TimeoutError:
                continue  # nothing yet: the connection is still open
            except OSError:  # reset: closed
                return time.monotonic() - started
    return None


@pytest.fixture(params=sorted(PROTOCOLS))
def server(request: pytest.FixtureRequest) -> Iterator[int]:
    port = free_port()
    config = uvicorn.Config(
        hello,
        port=port,
        http=PROTOCOLS[request.param],
        timeout_keep_alive=2,
        log_level="warning",
        lifespan="off",
    )
    served = uvicorn.Server(config)
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    wait_until(lambda: served.started, 10, "uvicorn")
    yield port
    served.should_exit = True
    thread.join(10)


def test_a_trickling_head_is_closed_and_keep_alive_still_works(server: int) -> None:
    closed = trickle(server, limit_s=8)
    assert closed is not None and 1.5 <= closed <= 4, closed
    # A prompt client on a keep-alive connection: two requests, the second sent after
    # a pause shorter than the timeout, both answered.
    with socket.create_connection(("127.0.0.1", server), timeout=5) as sock:
        for _ in range(2):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
            time.sleep(1)


def test_the_shipped_gateway_closes_a_slowloris_within_its_idle_timeout(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    assert Settings().gateway_idle_timeout_s == 15
    env = service_env(
        redis_server.url, f"file://{tmp_path / 'storage'}", "", f"slow-{os.getpid()}-"
    )
    gateway = GatewayProcess(env, tmp_path / "imageq.gateway.log").start()
    try:
        closed = trickle(gateway.port, limit_s=30)
    finally:
        gateway.stop()
    assert closed is not None and 13 <= closed <= 18, closed
