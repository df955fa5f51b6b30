"""Caption jobs under faults and attack: S3 storage, forbidden URLs, a SIGKILLed worker."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from imageq.workers.testing.services import WebhookReceiver, wait_until
from tests.fixtures.s3 import S3Server
from tests.fixtures.services import Stack
from tests.helpers import ImageServer, image_server, png_bytes, png_uri


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    with image_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def s3_stack(
    make_stack: Callable[..., Stack], tiny_caption_model: Path, s3_server: S3Server
) -> Stack:
    bucket = f"imageq-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=bucket)
    aws = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
    }
    stack = make_stack(
        IMAGEQ_MODEL_CAPTION=str(tiny_caption_model),
        IMAGEQ_STORAGE_URL=f"s3://{bucket}/deploy",
        **aws,
    )
    stack.extra.update(bucket=bucket, s3=s3_server.client())
    stack.worker("webhooks", "webhooks@s3")
    # The URL guard on: loopback and metadata addresses are refused for images.
    stack.worker("caption", "caption@s3", IMAGEQ_ALLOW_PRIVATE_URLS="0")
    return stack


def test_outputs_and_result_go_to_s3_with_presigned_urls(s3_stack: Stack) -> None:
    job = s3_stack.client.caption(image=png_uri(), attention=True)
    record = s3_stack.client.wait(job.id, 60)
    assert record.status == "succeeded", record.error
    bucket, s3 = s3_stack.extra["bucket"], s3_stack.extra["s3"]
    assert record.result_uri == f"s3://{bucket}/deploy/jobs/{job.id}/result.json"
    body = s3.get_object(Bucket=bucket, Key=f"deploy/jobs/{job.id}/result.json")
    assert json.loads(body["Body"].read())["status"] == "succeeded"
    overlay = record.output["captions"][0]["attention"]["overlay"]
    assert overlay["uri"].startswith(f"s3://{bucket}/deploy/jobs/{job.id}/")
    fetched = requests.get(overlay["url"], timeout=10)
    assert fetched.status_code == 200 and fetched.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert record.result_url is not None and record.result_url.startswith("http")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/good.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:{port}/good.png",
        "http://2130706433:{port}/good.png",
    ],
)
def test_private_and_metadata_urls_are_forbidden(
    s3_stack: Stack, images: ImageServer, url: str
) -> None:
    images.files["/good.png"] = png_bytes()
    hits = images.hits.get("/good.png", 0)
    worker = s3_stack.workers[-1]
    job = s3_stack.client.caption(image=url.format(port=images.port))
    record = s3_stack.client.wait(job.id, 60)
    assert record.status == "failed"
    assert record.error is not None and record.error.code == "forbidden_url", record.error
    assert images.hits.get("/good.png", 0) == hits  # refused before connecting
    assert worker.alive()
    assert s3_stack.client.wait(s3_stack.client.caption(image=png_uri()).id, 60).status == (
        "succeeded"
    )


def test_worker_killed_mid_job_completes_once_on_a_new_worker(
    make_stack: Callable[..., Stack],
    tiny_caption_model: Path,
    images: ImageServer,
    receiver: WebhookReceiver,
) -> None:
    stack = make_stack(IMAGEQ_MODEL_CAPTION=str(tiny_caption_model))
    stack.worker("webhooks", "webhooks@kill")
    first = stack.worker("caption", "caption-1@kill")
    images.files["/slow.png"] = png_bytes((9, 99, 199))
    images.slow["/slow.png"] = 4.0
    job = stack.client.caption(image=images.url("/slow.png"), webhook=receiver.url("/kill"))
    wait_until(lambda: stack.client.get(job.id).status == "running", 30, "job running")
    first.kill()
    assert stack.client.get(job.id).status == "running"
    second = stack.worker("caption", "caption-2@kill")
    record = stack.client.wait(job.id, 90)
    assert record.status == "succeeded"
    assert record.attempt == 2 and record.worker == "caption-2@kill"
    final = receiver.wait_for(lambda d: d.path == "/kill" and d.json()["data"]["id"] == job.id)
    time.sleep(1.5)
    deliveries = receiver.for_job(job.id)
    assert len(deliveries) == 1 == len(final)
    assert deliveries[0].json()["data"]["attempt"] == 2
    assert second.alive()
