"""The outermost layer of the gateway: caps, deadlines and metrics for every request.

A plain ASGI middleware (no per-request task or body copy, as BaseHTTPMiddleware would
add): headers over their caps get 431 before any route runs, a body over its cap 413
(at once when Content-Length says so, else as soon as the bytes pass it), and every
request a deadline (504), except event streams, which end on their own schedule.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imageq.api_client.settings import Settings
from imageq.gateway.errors import PayloadTooLarge, error_response
from imageq.gateway.metrics import GatewayMetrics

MAX_HEADERS = 100
# A multipart upload carries its boundary and part headers beside the image.
_MULTIPART_SLACK_BYTES = 64 * 1024


class Guard:
    def __init__(self, app: ASGIApp, settings: Settings, metrics: GatewayMetrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics

    def _body_cap(self, path: str) -> int:
        if path == "/v1/uploads":
            return self.settings.max_image_bytes + _MULTIPART_SLACK_BYTES
        if path in ("/v1/images/edits", "/v1/images/variations"):
            # An image and its mask, each within the upload cap.
            return 2 * self.settings.max_image_bytes + _MULTIPART_SLACK_BYTES
        return self.settings.gateway_max_body_bytes

    def _deadline_s(self, method: str, path: str) -> float | None:
        if path.endswith("/events"):
            return None  # bounded by gateway_stream_max_s instead
        if method == "POST" and path == "/v1/jobs":
            # Prefer: wait=N may hold a submit that long, on top of the submit itself.
            return self.settings.gateway_request_timeout_s + self.settings.gateway_max_wait_s
        if method == "POST" and path.startswith("/v1/images/"):
            # An images call waits for its job (then answers 504 itself, naming the job).
            return self.settings.gateway_request_timeout_s + self.settings.gateway_openai_wait_s
        return self.settings.gateway_request_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        answered: dict[str, Any] = {"status": 0}

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                answered["status"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, tracked_send, answered)
        finally:
            route = scope.get("route")
            self.metrics.observe(
                getattr(route, "path", "unmatched"),
                str(scope.get("method", "")),
                int(answered["status"] or 500),
                str((scope.get("state") or {}).get("tenant", "")),
                time.perf_counter() - started,
            )

    async def _guarded(
        self, scope: Scope, receive: Receive, send: Send, answered: dict[str, Any]
    ) -> None:
        headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
        path = str(scope.get("path", ""))
        size = sum(len(name) + len(value) + 4 for name, value in headers)
        if len(headers) > MAX_HEADERS or size > self.settings.gateway_max_header_bytes:
            await error_response(
                431,
                "headers_too_large",
                f"request headers over the cap ({MAX_HEADERS} headers, "
                f"{self.settings.gateway_max_header_bytes} bytes)",
                path=path,
            )(scope, receive, send)
            return
        cap = self._body_cap(path)
        declared = next((v for n, v in headers if n == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > cap):
            await error_response(
                413, "payload_too_large", f"body: larger than the limit of {cap} bytes", path=path
            )(scope, receive, send)
            return
        seen = 0

        async def capped_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    # Raised inside the route's body read: answered 413 by its handler.
                    raise PayloadTooLarge(f"body: larger than the limit of {cap} bytes")
            return message

        deadline = self._deadline_s(str(scope.get("method", "")), path)
        if deadline is None:
            await self.app(scope, capped_receive, send)
            return
        try:
            async with asyncio.timeout(deadline):
                await self.app(scope, capped_receive, send)
        except TimeoutError:
            if answered["status"]:
                raise  # the answer has begun: all that is left is to drop the connection
            await error_response(
                504, "timeout", f"the request took longer than {deadline:g} s", path=path
            )(scope, receive, send)
