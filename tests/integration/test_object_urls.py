"""Fresh presigned URLs on read: ``Client.get(id, presign=True)`` and ``imageq get --urls``."""

from __future__ import annotations

import urllib.request
import uuid

import pytest

from imageq.api_client.client import Client
from imageq.api_client.records import new_record
from imageq.api_client.schemas import JobStatus
from imageq.api_client.settings import Settings
from imageq.api_client.uploads import s3_client
from imageq.workers.testing.services import RedisServer
from tests.fixtures.s3 import S3Env


@pytest.fixture
def client(s3_env: S3Env, redis_server: RedisServer) -> Client:
    s3_client.cache_clear()  # the endpoint of this test's S3 server
    settings = Settings.from_env(
        {},
        broker_url=redis_server.url,
        storage_url=f"s3://{s3_env.bucket}/deploy",
        queue_prefix=f"urls-{uuid.uuid4().hex[:6]}-",
        presign_ttl_s=120,
    )
    return Client(settings)


def test_every_stored_file_gets_a_fresh_working_url(client: Client, s3_env: S3Env) -> None:
    job_id = str(uuid.uuid4())
    s3 = s3_client()
    for name, body in (("image-0.png", b"png bytes"), ("result.json", b"{}")):
        s3.put_object(Bucket=s3_env.bucket, Key=f"deploy/jobs/{job_id}/{name}", Body=body)
    base = f"s3://{s3_env.bucket}/deploy/jobs/{job_id}"
    record = new_record({"id": job_id, "kind": "generate"}).model_copy(
        update={
            "status": JobStatus.SUCCEEDED,
            "output": {"images": [{"uri": f"{base}/image-0.png", "url": "https://expired"}]},
            "result_uri": f"{base}/result.json",
            "result_url": "https://expired",
        }
    )
    client.store.create(record, {"id": job_id, "kind": "generate", "input": {}})

    plain = client.get(job_id)
    assert plain.output is not None and plain.output["images"][0]["url"] == "https://expired"
    fresh = client.get(job_id, presign=True)
    assert fresh.output is not None
    url = fresh.output["images"][0]["url"]
    assert url.startswith(s3_env.endpoint_url) and url != "https://expired"
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.read() == b"png bytes"
    assert fresh.result_url is not None
    with urllib.request.urlopen(fresh.result_url, timeout=10) as answer:
        assert answer.read() == b"{}"
    # The stored record is unchanged: URLs are made for the reader, not written back.
    stored = client.store.get(job_id)
    assert stored is not None and stored.result_url == "https://expired"


def test_local_storage_records_come_back_unchanged(redis_server: RedisServer) -> None:
    client = Client(Settings.from_env({}, broker_url=redis_server.url))
    job_id = str(uuid.uuid4())
    record = new_record({"id": job_id, "kind": "caption"}).model_copy(
        update={"result_uri": f"file:///tmp/jobs/{job_id}/result.json"}
    )
    client.store.create(record, {"id": job_id, "kind": "caption", "input": {}})
    assert client.get(job_id, presign=True) == client.get(job_id)
