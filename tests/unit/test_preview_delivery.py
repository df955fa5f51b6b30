"""Where a step preview goes: the job's progress, the gateway's SSE stream, the CLI file."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from imageq.api_client.cli import PreviewFile, build_parser
from imageq.api_client.object_urls import hide_storage_root, preview_key
from imageq.api_client.schemas import JobRecord, JobStatus
from imageq.gateway.stream import PREVIEW_EVENT, job_events
from imageq.workers.kinds.diffusion import DiffusionHandler
from imageq.workers.runtime.control import JobControl

ROOT = "file:///srv/store/"


class Store:
    def cancel_requested(self, job_id: str) -> bool:
        return False


def control() -> tuple[JobControl, list[dict[str, Any]], list[dict[str, Any]]]:
    written: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []

    def write(progress: dict[str, Any]) -> bool:
        written.append(progress)
        return True

    ctl = JobControl(
        "j", cast(Any, Store()), timeout_s=None, write_progress=write, on_preview=events.append
    )
    return ctl, written, events


def test_a_preview_rides_in_progress_until_the_next_one() -> None:
    ctl, written, events = control()
    ctl.progress(1, 10, stage="denoising")
    ctl.preview({"uri": ROOT + "jobs/j/preview.jpg", "step": 1, "total": 10})
    assert written[-1] == {
        "step": 1,
        "total": 10,
        "stage": "denoising",
        "preview": {"uri": ROOT + "jobs/j/preview.jpg", "step": 1, "total": 10},
    }
    assert events == [written[-1]]
    ctl.RECORD_EVERY_S = 0.0
    ctl.progress(2, 10, stage="denoising")
    assert written[-1]["step"] == 2 and written[-1]["preview"]["step"] == 1


def record(progress: dict[str, Any] | None, status: JobStatus = JobStatus.RUNNING) -> JobRecord:
    return JobRecord(
        id="j", kind="generate", status=status, progress=progress, created_at="2026-01-01T00:00:00Z"
    )


class Hub:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()

    @asynccontextmanager
    async def watch(self, channel: str) -> AsyncIterator[asyncio.Queue[str | None]]:
        yield self.queue


def test_the_stream_sends_each_new_preview_once_with_its_image() -> None:
    jpeg = b"\xff\xd8jpeg bytes"
    shown = {"uri": ROOT + "jobs/j/preview.jpg", "step": 2, "total": 4}
    records = [
        record({"step": 1, "total": 4}),
        record({"step": 2, "total": 4, "preview": shown}),
        record({"step": 3, "total": 4, "preview": shown}),
        record({"step": 4, "total": 4, "preview": {**shown, "step": 4}}),
        record(None, JobStatus.SUCCEEDED),
    ]
    read_keys: list[str] = []

    async def preview(job_id: str) -> bytes | None:
        read_keys.append(preview_key(job_id))
        return jpeg

    async def run() -> list[dict[str, str]]:
        hub = Hub()
        for rec in records[1:]:
            hub.queue.put_nowait(rec.model_dump_json())

        async def read(job_id: str) -> JobRecord | None:
            return records[0]

        def render(rec: JobRecord) -> dict[str, Any]:
            return cast(dict[str, Any], hide_storage_root(rec.to_json(), ROOT))

        return [e async for e in job_events(cast(Any, hub), "c", read, "j", 10, render, preview)]

    sent = asyncio.run(run())
    names = [e["event"] for e in sent]
    assert names == [
        "progress",
        "progress",
        PREVIEW_EVENT,
        "progress",
        "progress",
        PREVIEW_EVENT,
        "done",
    ]
    first = json.loads(sent[2]["data"])
    assert first["step"] == 2 and first["uri"] == "storage://jobs/j/preview.jpg"
    assert base64.b64decode(first["image"]) == jpeg
    assert json.loads(sent[5]["data"])["step"] == 4
    assert read_keys == ["jobs/j/preview.jpg"] * 2
    assert [int(e["id"]) for e in sent] == list(range(1, 8))


class FakeClient:
    def __init__(self) -> None:
        self.images = [b"first", b"second"]
        self.asked = 0

    def preview(self, job_id: str) -> bytes | None:
        self.asked += 1
        return self.images.pop(0) if self.images else None


def test_cli_keeps_the_latest_preview_on_disk(tmp_path: Path) -> None:
    args = build_parser().parse_args(["get", "j", "--follow", "--preview", str(tmp_path / "p.jpg")])
    assert args.preview == str(tmp_path / "p.jpg")
    client = FakeClient()
    keep = PreviewFile(cast(Any, client), "j", tmp_path / "p.jpg")
    keep.update(record({"step": 1, "total": 4}))
    assert not (tmp_path / "p.jpg").exists() and client.asked == 0
    one = {"uri": "u", "step": 1}
    keep.update(record({"step": 1, "total": 4, "preview": one}))
    keep.update(record({"step": 2, "total": 4, "preview": one}))  # the same preview: no read
    assert (tmp_path / "p.jpg").read_bytes() == b"first" and client.asked == 1
    keep.update(record({"step": 3, "total": 4, "preview": {"uri": "u", "step": 3}}))
    assert (tmp_path / "p.jpg").read_bytes() == b"second" and keep.saved == 2


def ctx() -> Any:
    return SimpleNamespace(settings=SimpleNamespace(preview_interval_ms=500))


def test_previews_false_or_a_worker_without_previews_gets_no_publisher() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from imageq.api_client.inputs import GenerateInput
    from imageq.api_client.schemas import JobDocument
    from imageq.workers.predictors.previews import LinearDecoder

    ctl, _, _ = control()
    on = GenerateInput(prompt="p")
    off = GenerateInput(prompt="p", previews=False)
    job = JobDocument(id="j", kind="generate", input=on)
    with ThreadPoolExecutor(1) as pool:
        handler = DiffusionHandler(
            ctx(),
            cast(Any, None),
            cast(Any, None),
            cast(Any, None),
            previews=LinearDecoder(),
            preview_executor=pool,
        )
        made = handler._publisher(job, on, ctl)
        assert made is not None and made.interval_s == 0.5
        assert handler._publisher(job, off, ctl) is None
    bare = DiffusionHandler(ctx(), cast(Any, None), cast(Any, None), cast(Any, None))
    assert bare._publisher(job, on, ctl) is None
