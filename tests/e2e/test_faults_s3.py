"""The S3 server goes down while a job uploads its outputs.

The workers reach moto through this module's own endpoint, a TCP relay on a fixed
loopback port. Taking it down resets every connection at once, as a crashed server
behind a load balancer does, while the objects already stored survive (moto keeps its
data only in memory, so stopping moto itself would also lose every earlier upload and
make "no partial output" impossible to check). Pass criteria: a short outage is
retried and the job succeeds with every output whole; a long one fails the job cleanly
(final record, one final webhook, no output advertised); the worker lives through both.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imageq.api_client.error_details import is_reported
from imageq.workers.testing.services import WebhookReceiver, free_port, wait_until
from tests.fixtures.s3 import S3Server
from tests.fixtures.services import Stack
from tests.helpers import ImageServer, image_server, png_bytes

# Seconds to a minute each (worker restarts, outages): CI runs them too.
pytestmark = pytest.mark.slow

STORAGE_RETRIES = 3  # per call 0.2 + 0.4 + 0.8 s, then 3 re-runs 0.4, 0.8, 1.6 s apart


class Relay:
    """127.0.0.1:port -> the S3 server; ``down()`` resets every connection until ``up()``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.is_down = False
        self.dropped = 0
        self.puts = 0
        # Go down as the N-th upload (PUT) starts, so earlier uploads of a job are stored.
        self.down_at_put = 0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.is_down:
                self.dropped += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, upload: bool) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                if upload and data.startswith(b"PUT "):
                    self.puts += 1
                    if self.puts == self.down_at_put:
                        self.down()
                        return
                sink.sendall(data)
        with suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def down(self) -> None:
        self.is_down = True
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            _reset(conn)

    def up(self) -> None:
        self.is_down = False

    def close(self) -> None:
        self.down()
        self._listener.close()


def _reset(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    with image_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def relay(s3_server: S3Server) -> Iterator[Relay]:
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    found = Relay(port)
    yield found
    found.close()


@pytest.fixture(scope="module")
def stack(
    make_stack: Callable[..., Stack], tiny_caption_model: Path, s3_server: S3Server, relay: Relay
) -> Stack:
    bucket = f"imageq-outage-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    found = make_stack(
        IMAGEQ_MODEL_CAPTION=str(tiny_caption_model),
        IMAGEQ_STORAGE_URL=f"s3://{bucket}/out",
        IMAGEQ_STORAGE_RETRIES=str(STORAGE_RETRIES),
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=relay.endpoint_url,
    )
    found.extra.update(bucket=bucket, s3=s3_server.client())
    found.worker("webhooks", "webhooks@outage")
    found.worker("caption", "caption@outage")
    return found


def _objects(stack: Stack, job_id: str) -> dict[str, bytes]:
    s3: Any = stack.extra["s3"]
    bucket = stack.extra["bucket"]
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"out/jobs/{job_id}/")
    return {
        item["Key"].rsplit("/", 1)[1]: s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        for item in listing.get("Contents", [])
    }


def _submit_slow(stack: Stack, images: ImageServer, receiver: WebhookReceiver, name: str) -> str:
    path = f"/{name}.png"
    images.files[path] = png_bytes((90, 20, 160))
    images.slow[path] = 1.0
    job = stack.client.caption(
        image=images.url(path), attention=True, webhook=receiver.url(f"/{name}")
    )
    wait_until(lambda: images.hits.get(path, 0) >= 1, 60, "the job fetching its image")
    return job.id


def test_short_outage_during_upload_is_retried_and_the_outputs_are_whole(
    stack: Stack,
    relay: Relay,
    images: ImageServer,
    receiver: WebhookReceiver,
    record_property: Callable[[str, object], None],
) -> None:
    job_id = _submit_slow(stack, images, receiver, "short-outage")
    relay.down()  # before the job's first upload, for longer than one call's retries
    time.sleep(4.0)
    assert stack.client.get(job_id).status in ("running", "queued")
    relay.up()
    record = stack.client.wait(job_id, 60)
    assert relay.dropped > 0, "the outage never met an upload"
    assert record.status == "succeeded", record.error
    record_property("connections_reset", relay.dropped)
    # Longer than one call's retries: the job was handed back and run again, whole.
    log = stack.workers[-1].log_path.read_text()
    assert f"job {job_id}: put s3://" in log and "retry 1 in" in log
    assert images.hits["/short-outage.png"] >= 2
    stored = _objects(stack, job_id)
    assert set(stored) == {"attention-0.json", "attention-0.png", "result.json"}
    assert json.loads(stored["result.json"]) == record.to_json()
    assert json.loads(stored["attention-0.json"])["tokens"]
    Image.open(io.BytesIO(stored["attention-0.png"])).verify()
    refs = record.output["captions"][0]["attention"] if record.output else {}
    assert refs["overlay"]["uri"].endswith("attention-0.png")
    receiver.wait_for(lambda d: d.path == "/short-outage")
    time.sleep(1.0)
    assert [d.json()["type"] for d in receiver.for_job(job_id)] == ["job.succeeded"]


def test_long_outage_fails_the_job_cleanly(
    stack: Stack,
    relay: Relay,
    images: ImageServer,
    receiver: WebhookReceiver,
    record_property: Callable[[str, object], None],
) -> None:
    # Down as the job's second upload starts: its first output is stored, the rest never.
    relay.down_at_put = relay.puts + 2
    job_id = _submit_slow(stack, images, receiver, "long-outage")
    began = time.monotonic()
    try:
        record = stack.client.wait(job_id, 90)
        record_property("outage_to_failed_s", round(time.monotonic() - began, 1))
        assert record.status == "failed"
        assert record.error is not None and record.error.code == "internal", record.error
        # The job reads an error id; what happened is for operators, under that id.
        error_id = record.error.message.removeprefix("internal error (error id ").rstrip(")")
        assert is_reported(record.error.message), record.error.message
        detail = stack.client.error_detail(error_id)
        assert detail is not None and "gave up" in detail["message"], detail
        assert record.output is None
        # The final event goes out although result.json could not be written.
        event = receiver.wait_for(lambda d: d.path == "/long-outage")
        assert event[0].json()["type"] == "job.failed"
        assert event[0].json()["data"]["output"] is None
    finally:
        relay.up()
    assert relay.is_down is False and relay.dropped > 0
    # The record advertises no output; what the first try stored is whole, never cut
    # (an S3 PUT is all or nothing), and the upload that met the outage left nothing.
    stored = _objects(stack, job_id)
    assert set(stored) == {"attention-0.json"}
    assert json.loads(stored["attention-0.json"])["tokens"]
    time.sleep(1.0)
    assert len(receiver.for_job(job_id)) == 1
    assert all(w.alive() for w in stack.workers)
    later = stack.client.caption(image=images.url("/short-outage.png"), attention=True)
    assert stack.client.wait(later.id, 60).status == "succeeded"
