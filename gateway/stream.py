"""Waiting on a job over HTTP: ``Prefer: wait=N`` on submit, and the event stream.

Both follow the job's channel through the process's ``UpdateHub`` and never poll Redis
faster than ``updates.POLL_S``; a record that cannot be re-read (Redis away for a
moment) leaves the last one known standing.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from imageq.api_client.schemas import JobRecord
from imageq.gateway.updates import POLL_S, UpdateHub, next_update

#: Reads a job's current record (None: gone).
Reader = Callable[[str], Awaitable[JobRecord | None]]
#: Reads a job's latest step preview (None: none, or not readable now).
PreviewReader = Callable[[str], Awaitable[bytes | None]]

#: The event a stream ends with, once, carrying the final record.
FINAL_EVENT = "done"
PROGRESS_EVENT = "progress"
#: A diffusion job's step preview: ``progress.preview`` plus the JPEG as base64 ``image``.
PREVIEW_EVENT = "preview"


def _parse(update: str) -> JobRecord | None:
    try:
        return JobRecord.model_validate_json(update)
    except ValueError:
        return None


async def _refresh(read: Reader, job_id: str, current: JobRecord) -> JobRecord | None:
    try:
        return await read(job_id)
    except (RedisError, OSError):
        return current


async def wait_final(
    hub: UpdateHub, channel: str, read: Reader, record: JobRecord, seconds: float
) -> JobRecord:
    """The record once final, or as it stands when ``seconds`` pass (or Redis drops)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        async with hub.watch(channel) as updates:
            current = await _refresh(read, record.id, record) or record
            while not current.is_final:
                left = deadline - loop.time()
                if left <= 0:
                    break
                got, update = await next_update(updates, min(left, POLL_S))
                fresh = _parse(update) if got and update else None
                if fresh is None:
                    fresh = await _refresh(read, record.id, current)
                current = fresh or current
            return current
    except (RedisError, OSError):
        # The job was accepted; the answer is what is known of it, not an error.
        return record


async def job_events(
    hub: UpdateHub,
    channel: str,
    read: Reader,
    job_id: str,
    max_s: float,
    render: Callable[[JobRecord], dict[str, Any]],
    preview: PreviewReader | None = None,
) -> AsyncIterator[dict[str, str]]:
    """Server-sent events of one job: ``progress`` on each change, ``preview`` on each
    new step preview (read with ``preview``), then ``done``.

    A job already final gets its ``done`` at once. The stream also ends after
    ``max_s`` (a client reconnects, as EventSource does on its own).
    """
    try:
        async for event in _events(hub, channel, read, job_id, max_s, render, preview):
            yield event
    except (RedisError, OSError):
        # Redis went away mid-stream: end it; the client reconnects and reads again.
        return


async def _events(
    hub: UpdateHub,
    channel: str,
    read: Reader,
    job_id: str,
    max_s: float,
    render: Callable[[JobRecord], dict[str, Any]],
    preview: PreviewReader | None,
) -> AsyncIterator[dict[str, str]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_s
    sequence = 0
    last_sent = ""
    last_preview: Any = None
    async with hub.watch(channel) as updates:
        current = await read(job_id)
        while current is not None:
            shown = render(current)
            body = json.dumps(shown)
            if current.is_final:
                sequence += 1
                yield {"event": FINAL_EVENT, "id": str(sequence), "data": body}
                return
            if body != last_sent:
                sequence += 1
                last_sent = body
                yield {"event": PROGRESS_EVENT, "id": str(sequence), "data": body}
            step_preview = (shown.get("progress") or {}).get("preview")
            if preview is not None and step_preview and step_preview != last_preview:
                last_preview = step_preview
                image = await preview(job_id)
                if image is not None:
                    sequence += 1
                    data = {**step_preview, "image": base64.b64encode(image).decode()}
                    yield {"event": PREVIEW_EVENT, "id": str(sequence), "data": json.dumps(data)}
            left = deadline - loop.time()
            if left <= 0:
                return
            got, update = await next_update(updates, min(left, POLL_S))
            fresh = _parse(update) if got and update else None
            current = fresh or await _refresh(read, job_id, current)
