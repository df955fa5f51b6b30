"""The gateway's Redis side against a real redis-server: tokens (hashes only, constant-time
check, revocation), per-tenant limits (rate bucket, in-flight set, atomic under
concurrency), and what the Client gained for it (tenants, idempotency conflicts,
pagination, uploads that workers read back)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from pydantic import SecretStr

from imageq.api_client.client import Client
from imageq.api_client.errors import IdempotencyConflict, InvalidInput
from imageq.api_client.job_ids import job_id_for
from imageq.api_client.records import RecordStore, connect
from imageq.api_client.schemas import JobStatus
from imageq.api_client.settings import Settings
from imageq.gateway import limits as limits_module
from imageq.gateway.limits import Limits
from imageq.gateway.tokens import Authenticator, TokenStore
from imageq.workers.io.images import fetch_bytes
from imageq.workers.testing.services import RedisServer
from tests.helpers import png_bytes

_n = itertools.count()
BODY = {"image": "https://example.com/cat.jpg"}


@pytest.fixture
def settings(redis_server: RedisServer, tmp_path: Path) -> Settings:
    return Settings(
        broker_url=redis_server.url,
        storage_url=f"file://{tmp_path / 'storage'}",
        queue_prefix=f"gws{next(_n)}-{os.getpid()}-",
        webhook_secret="whsec_" + "A" * 32,
    )


@pytest.fixture
def r(settings: Settings) -> Iterator[redis.Redis]:
    client = connect(settings.records_redis_url)
    yield client
    client.close()


@pytest.fixture
def store(r: redis.Redis, settings: Settings) -> RecordStore:
    return RecordStore(r, settings)


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings) as c:
        yield c


def authenticate(settings: Settings, store: RecordStore, header: str | None) -> str | None:
    async def run() -> str | None:
        aclient = aioredis.Redis.from_url(settings.records_redis_url, decode_responses=True)
        try:
            tenant = await Authenticator(aclient, store, cache_s=0).tenant(header)
            return None if tenant is None else tenant.name
        finally:
            await aclient.aclose()

    return asyncio.run(run())


# -- tokens -------------------------------------------------------------------------


def test_token_is_stored_only_as_its_hash(
    r: redis.Redis, store: RecordStore, settings: Settings
) -> None:
    tokens = TokenStore(r, store)
    token = tokens.create("acme", rate=5, max_in_flight=3)
    assert token.startswith("iq_") and len(token) > 40
    everything = [
        str(key) + json.dumps(r.hgetall(key) if r.type(key) == "hash" else str(r.dump(key)))
        for key in r.scan_iter(match=store.keys.namespace + "gw:*")
    ]
    assert everything and not any(token in entry or token[3:] in entry for entry in everything)
    listed = tokens.tenants()
    assert listed[0]["tenant"] == "acme" and listed[0]["rate"] == 5.0
    assert listed[0]["max_in_flight"] == 3
    assert [t["prefix"] for t in listed[0]["tokens"]] == [token[:11]]
    assert authenticate(settings, store, f"Bearer {token}") == "acme"
    assert authenticate(settings, store, f"bearer {token}") == "acme"


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Basic abc", "Bearer iq_wrong", "Bearer " + "x" * 300]
)
def test_missing_or_wrong_tokens_are_nobody(
    r: redis.Redis, store: RecordStore, settings: Settings, header: str | None
) -> None:
    TokenStore(r, store).create("acme")
    assert authenticate(settings, store, header) is None


def test_revoke_by_prefix_or_tenant(r: redis.Redis, store: RecordStore, settings: Settings) -> None:
    tokens = TokenStore(r, store)
    first, second = tokens.create("acme"), tokens.create("acme")
    other = tokens.create("globex")
    assert tokens.revoke(first[:11]) == [first[:11]]
    assert authenticate(settings, store, f"Bearer {first}") is None
    assert authenticate(settings, store, f"Bearer {second}") == "acme"
    assert tokens.revoke(other) == [other[:11]]  # the whole token works as its prefix
    assert tokens.revoke("acme") == [second[:11]]
    assert authenticate(settings, store, f"Bearer {second}") is None
    assert tokens.revoke("iq_nothing-like-it") == []
    with pytest.raises(InvalidInput):
        tokens.revoke("iq_")  # too short to name one token
    listed = {t["tenant"]: t for t in tokens.tenants()}
    assert listed["acme"]["tokens"] == [] and listed["globex"]["tokens"] == []


@pytest.mark.parametrize("name", ["", "-x", "a b", "a/b", "iq_x", "x" * 65, "ü"])
def test_tenant_names_are_checked(r: redis.Redis, store: RecordStore, name: str) -> None:
    with pytest.raises(InvalidInput, match="tenant"):
        TokenStore(r, store).create(name)


# -- limits -------------------------------------------------------------------------


def test_rate_is_a_token_bucket(r: redis.Redis, store: RecordStore, settings: Settings) -> None:
    TokenStore(r, store).create("acme", rate=2)
    limits = Limits(r, store, settings)
    assert limits.take("acme") == 0.0
    assert limits.take("acme") == 0.0  # a burst of one second's worth
    wait = limits.take("acme")
    assert 0.0 < wait <= 0.5
    assert limits.take("acme", "uploads") == 0.0  # uploads have their own bucket
    time.sleep(wait + 0.05)
    assert limits.take("acme") == 0.0


def test_defaults_apply_and_zero_means_no_limit(
    r: redis.Redis, store: RecordStore, settings: Settings
) -> None:
    TokenStore(r, store).create("free", rate=0, max_in_flight=0)
    TokenStore(r, store).create("plain")  # the deployment's defaults
    limits = Limits(
        r, store, settings.with_(gateway_default_rate=1, gateway_default_max_in_flight=1)
    )
    assert all(limits.admit("free", f"job-{i}").allowed for i in range(50))
    assert limits.admit("plain", "job-a").allowed
    assert not limits.admit("plain", "job-b").allowed


def test_in_flight_cap_sweeps_finished_jobs(
    r: redis.Redis, store: RecordStore, settings: Settings, client: Client
) -> None:
    TokenStore(r, store).create("acme", rate=0, max_in_flight=2)
    limits = Limits(r, store, settings)
    jobs = []
    for _ in range(2):
        job_id = f"job-{time.time_ns()}"
        assert limits.admit("acme", job_id).allowed
        jobs.append(client.submit_once("caption", BODY, tenant="acme", job_id=job_id)[0])
    refused = limits.admit("acme", "job-3")
    assert refused.full_at == 2 and refused.retry_after_s is None
    # A replayed key needs no room in flight.
    assert limits.admit("acme", None).allowed
    client.cancel(jobs[0].id)
    assert store.get(jobs[0].id).status == JobStatus.CANCELED  # type: ignore[union-attr]
    assert limits.admit("acme", "job-3").allowed  # the sweep freed the canceled job's room
    limits.release("acme", "job-3")
    assert limits.sweep("acme") == 1


def test_admitted_ids_without_a_record_count_until_they_are_stale(
    r: redis.Redis, store: RecordStore, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    TokenStore(r, store).create("acme", rate=0, max_in_flight=1)
    limits = Limits(r, store, settings)
    assert limits.admit("acme", "in-between").allowed  # admitted, record not made yet
    assert not limits.admit("acme", "next").allowed
    monkeypatch.setattr(limits_module, "SLOT_TTL_S", 0.0)
    assert limits.admit("acme", "next").allowed  # its gateway died: no longer counted


def test_admission_is_atomic_under_concurrency(
    r: redis.Redis, store: RecordStore, settings: Settings
) -> None:
    TokenStore(r, store).create("acme", rate=0, max_in_flight=5)
    limits = Limits(r, store, settings)
    allowed: list[bool] = []
    barrier = threading.Barrier(20)

    def one(i: int) -> None:
        barrier.wait()
        allowed.append(limits.admit("acme", f"job-{i}").allowed)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert allowed.count(True) == 5


def test_a_refused_submit_spends_no_rate(
    r: redis.Redis, store: RecordStore, settings: Settings
) -> None:
    TokenStore(r, store).create("acme", rate=1, max_in_flight=1)
    limits = Limits(r, store, settings)
    assert limits.admit("acme", "a").allowed
    time.sleep(1.05)
    assert limits.admit("acme", "b").full_at == 1
    limits.release("acme", "a")
    assert limits.admit("acme", "b").allowed  # the refusal above left the bucket full


# -- the Client side ----------------------------------------------------------------


def test_tenant_keys_and_idempotency_conflicts(client: Client) -> None:
    a = client.submit("caption", BODY, idempotency_key="k", tenant="acme")
    b = client.submit("caption", BODY, idempotency_key="k", tenant="globex")
    plain = client.submit("caption", BODY, idempotency_key="k")
    assert len({a.id, b.id, plain.id}) == 3
    assert (a.tenant, b.tenant, plain.tenant) == ("acme", "globex", None)
    assert "tenant" not in plain.to_json()
    again, created = client.submit_once("caption", BODY, idempotency_key="k", tenant="acme")
    assert again.id == a.id and not created
    with pytest.raises(IdempotencyConflict):
        client.submit("caption", {**BODY, "prompt": "a"}, idempotency_key="k", tenant="acme")
    with pytest.raises(IdempotencyConflict):
        client.submit("caption", BODY, idempotency_key="k", tenant="acme", priority=9)
    with pytest.raises(InvalidInput, match="id"):
        client.submit_once("caption", BODY, idempotency_key="k", job_id="x")


def test_tenant_ids_are_keyed_by_the_deployments_id_secret(
    client: Client, settings: Settings, store: RecordStore
) -> None:
    # No IMAGEQ_ID_SECRET: the first producer generates one into Redis, and every other
    # producer of the deployment (another Client, the gateway's) derives the same ids.
    first = client.job_id_for("order-1", "acme")
    assert store.redis.get(store.keys.id_secret())
    with Client(settings) as other:
        assert other.job_id_for("order-1", "acme") == first
        assert other.submit("caption", BODY, idempotency_key="order-1", tenant="acme").id == first
    # Two deployments with different secrets: different ids; the same secret: the same.
    keyed = settings.model_copy(update={"id_secret": SecretStr("x" * 32)})
    with Client(keyed) as a, Client(keyed) as b:
        assert a.job_id_for("order-1", "acme") == b.job_id_for("order-1", "acme") != first
    with Client(settings.model_copy(update={"id_secret": SecretStr("y" * 32)})) as c:
        assert c.job_id_for("order-1", "acme") not in (first, a.job_id_for("order-1", "acme"))
    # Jobs without a tenant keep the public derivation (their producers hold Redis).
    assert client.job_id_for("order-1") == job_id_for("order-1")


def test_list_page_is_per_tenant_newest_first_and_stable(client: Client) -> None:
    ids = [client.submit("caption", BODY, tenant="acme").id for _ in range(7)]
    client.submit("caption", BODY, tenant="globex")
    client.submit("match", {**BODY, "texts": ["a"]}, tenant="acme")
    seen, cursor = [], None
    while True:
        page, cursor = client.list_page(kind="caption", limit=3, cursor=cursor, tenant="acme")
        seen += [r.id for r in page]
        if cursor is None:
            break
        # Jobs submitted while paging do not shift the pages still to come.
        client.submit("caption", BODY, tenant="acme")
    assert seen == list(reversed(ids))
    assert [r.tenant for r in client.list(tenant="globex")] == ["globex"]
    with pytest.raises(InvalidInput, match="cursor"):
        client.list_page(cursor="%%%", tenant="acme")


def test_upload_is_read_back_by_the_workers_loader(client: Client, settings: Settings) -> None:
    data = png_bytes((1, 2, 3), (20, 10))
    ref = client.upload(data, "image/png", tenant="acme")
    assert ref.startswith("storage://uploads/acme/") and ref.endswith(".png")
    assert fetch_bytes(ref, settings) == data
    with pytest.raises(InvalidInput):
        client.upload(b"not an image")
    with pytest.raises(InvalidInput):
        client.upload(data, "text/plain")
    with pytest.raises(InvalidInput, match="limit"):
        Client(settings.with_(max_image_bytes=10)).upload(data)
    from imageq.api_client.errors import ForbiddenUrl

    for bad in ("storage://jobs/x/result.json", "storage://uploads/../jobs/x", "storage://"):
        with pytest.raises(ForbiddenUrl):
            fetch_bytes(bad, settings)
