"""uvicorn's HTTP protocols with a deadline on each request head (slowloris).

uvicorn (0.55) times out only an idle keep-alive connection, and only after a response:
its timer starts in ``on_response_complete`` and any byte received stops it. A client
that opens a connection and sends its headers one byte a second holds it (and its slot
under ``limit_concurrency``) forever, with h11 and httptools alike. These subclasses
give every request head ``timeout_keep_alive`` seconds from the moment the connection
opens or the previous response ends; bytes that trickle in do not extend it. Bodies are
bounded by the app's own request deadline (``Guard``).
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeadClock:
    """One connection's deadline for the head of its next request."""

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        self.loop = loop
        self.seconds = seconds
        self.timer: asyncio.TimerHandle | None = None
        # The request cycle current when armed: a new one means a head has arrived.
        self.armed_for: object = None

    def arm(self, transport: asyncio.BaseTransport, cycle: object) -> None:
        self.cancel()
        if transport.is_closing():
            return
        self.armed_for = cycle
        self.timer = self.loop.call_later(self.seconds, transport.close)

    def seen(self, cycle: object) -> None:
        """Called after bytes are parsed: a cycle that was not there when armed means
        the request head is complete."""
        if self.timer is not None and cycle is not None and cycle is not self.armed_for:
            self.cancel()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class HeadTimeoutHttpTools(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_clock = HeadClock(self.loop, self.timeout_keep_alive)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(cast(asyncio.Transport, transport))
        self.head_clock.arm(transport, self.cycle)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.head_clock.seen(self.cycle)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is None or self.cycle.response_complete:  # no pipelined request
            self.head_clock.arm(self.transport, self.cycle)

    def connection_lost(self, exc: Exception | None) -> None:
        self.head_clock.cancel()
        super().connection_lost(exc)


class HeadTimeoutH11(H11Protocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_clock = HeadClock(self.loop, self.timeout_keep_alive)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(cast(asyncio.Transport, transport))
        self.head_clock.arm(transport, self.cycle)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.head_clock.seen(self.cycle)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is None or self.cycle.response_complete:  # no pipelined request
            self.head_clock.arm(self.transport, self.cycle)

    def connection_lost(self, exc: Exception | None) -> None:
        self.head_clock.cancel()
        super().connection_lost(exc)


PROTOCOLS: dict[str, type[asyncio.Protocol]] = {
    "httptools": HeadTimeoutHttpTools,
    "h11": HeadTimeoutH11,
}
