"""Tenants kept apart over HTTP, against a real redis-server: another tenant's job reads
as a missing one (same answer, same Redis work), priorities capped per tenant, list
cursors checked. The app runs in-process (Starlette's TestClient runs its lifespan)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from imageq.api_client.records import RecordStore, connect
from imageq.api_client.settings import Settings
from imageq.gateway.app import create_app
from imageq.gateway.tokens import TokenStore
from imageq.workers.testing.services import RedisServer
from tests.fixtures.gateway import make_token

_n = itertools.count()
BODY = {"kind": "caption", "input": {"image": "https://example.com/cat.jpg"}}


@pytest.fixture
def settings(redis_server: RedisServer, tmp_path: Path) -> Settings:
    return Settings(
        broker_url=redis_server.url,
        storage_url=f"file://{tmp_path / 'storage'}",
        queue_prefix=f"gwt{next(_n)}-{os.getpid()}-",
        allow_private_urls=True,
    )


@pytest.fixture
def r(settings: Settings) -> Iterator[redis.Redis]:
    client = connect(settings.records_redis_url)
    yield client
    client.close()


@pytest.fixture
def http(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Recorder:
    """Every Redis command the gateway sends, on both its connections."""

    def __init__(self, http: TestClient) -> None:
        self.calls: list[tuple[Any, ...]] = []
        gw = cast(FastAPI, http.app).state.gateway
        aredis, sync = gw.aredis, gw.client.redis
        async_call, sync_call = aredis.execute_command, sync.execute_command

        async def recorded_async(*args: Any, **options: Any) -> Any:
            self.calls.append(("async", *args))
            return await async_call(*args, **options)

        def recorded_sync(*args: Any, **options: Any) -> Any:
            self.calls.append(("sync", *args))
            return sync_call(*args, **options)

        aredis.execute_command = recorded_async
        sync.execute_command = recorded_sync

    def take(self, job_id: str) -> list[tuple[Any, ...]]:
        calls = [
            tuple("ID" if a == job_id or job_id in str(a) else a for a in c) for c in self.calls
        ]
        self.calls.clear()
        return calls


def test_another_tenants_job_answers_as_a_missing_one_with_the_same_redis_work(
    http: TestClient, r: redis.Redis, settings: Settings
) -> None:
    acme = make_token(r, settings, "acme")
    globex = make_token(r, settings, "globex")
    theirs = http.post("/v1/jobs", json=BODY, headers=bearer(globex)).json()["id"]
    missing = "0" * 8 + theirs[8:]  # the same shape, never submitted
    assert http.get("/v1/jobs", headers=bearer(acme)).status_code == 200  # token cached
    recorder = Recorder(http)
    for method, suffix in (("GET", ""), ("POST", "/cancel"), ("GET", "/events")):
        answers, work = [], []
        for job_id in (theirs, missing):
            answer = http.request(method, f"/v1/jobs/{job_id}{suffix}", headers=bearer(acme))
            body = answer.text.replace(job_id, "ID")
            answers.append((answer.status_code, body, sorted(answer.headers.items())))
            work.append(recorder.take(job_id))
        assert answers[0] == answers[1], (method, suffix)
        assert answers[0][0] == 404
        # The same commands in the same order: neither path skips a read the other makes.
        assert work[0] == work[1] and work[0], (method, suffix, work)
    # And the job itself was left alone.
    assert http.get(f"/v1/jobs/{theirs}", headers=bearer(globex)).json()["status"] == "queued"


def test_a_tenant_may_not_ask_for_more_than_its_max_priority(
    http: TestClient, r: redis.Redis, settings: Settings
) -> None:
    default = make_token(r, settings, "acme")
    store = TokenStore(r, RecordStore(r, settings))
    trusted = store.create("globex", rate=0, max_in_flight=0, max_priority=9)
    assert settings.gateway_default_max_priority == 5
    ok = http.post("/v1/jobs", json={**BODY, "priority": 5}, headers=bearer(default))
    assert ok.status_code == 201
    over = http.post("/v1/jobs", json={**BODY, "priority": 6}, headers=bearer(default))
    assert over.status_code == 422
    error = over.json()["error"]
    assert error["code"] == "invalid_input" and error["field"] == "priority"
    assert "5" in error["message"]
    assert http.post("/v1/jobs", json={**BODY, "priority": 9}, headers=bearer(trusted)).is_success
    assert [t["max_priority"] for t in store.tenants()] == [None, 9]


@pytest.mark.parametrize(
    "cursor",
    [
        "%%%",
        "bmFu",  # base64 of "nan"
        "WyJuYW4iLCAiYSJd",  # ["nan", "a"]
        "WyJpbmYiLCAiYSJd",  # ["inf", "a"]
        "WyIxLjAiLCBbMV1d",  # ["1.0", [1]]
        "WyIxLjAiLCAiLi4vLi4iXQ",  # ["1.0", "../.."]
        "e30",  # {}
    ],
)
def test_a_bad_cursor_is_a_400_naming_it(
    http: TestClient, r: redis.Redis, settings: Settings, cursor: str
) -> None:
    token = make_token(r, settings, "acme")
    answer = http.get("/v1/jobs", params={"cursor": cursor}, headers=bearer(token))
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "invalid_input"
    assert answer.json()["error"]["field"] == "cursor"
