"""The HTTP gateway end to end: the real server process (``imageq gateway``, uvicorn on a
free loopback port), real caption, diffusion and webhooks workers on tiny models, and a
real HTTP client.

The module runs its own redis-server, so stopping it (the 503 case, last) disturbs no
other test. The gateway runs as production would: private webhook URLs refused.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from imageq.api_client.object_urls import hide_storage_root, storage_root
from imageq.workers.testing.services import RedisServer, free_port, wait_until
from tests.fixtures.gateway import GatewayProcess, make_token
from tests.fixtures.services import Stack, service_env
from tests.helpers import bomb_png, png_bytes, png_uri

FAST: dict[str, Any] = {"width": 64, "height": 64, "steps": 3}
# Long enough to be canceled mid-run (tens of milliseconds a step on a tiny UNet).
SLOW: dict[str, Any] = {"width": 256, "height": 256, "steps": 150}
UPLOAD_CAP = 300_000
_n = itertools.count()


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("gateway-redis"), appendonly=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(
    own_redis: RedisServer,
    webhook_secret: str,
    tiny_caption_model: Path,
    tiny_sd_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("gateway-stack")
    env = service_env(
        own_redis.url,
        f"file://{tmp / 'storage'}",
        webhook_secret,
        f"gw{next(_n)}-{os.getpid()}-",
        IMAGEQ_MODEL_CAPTION=str(tiny_caption_model),
        IMAGEQ_MODEL_DIFFUSION=str(tiny_sd_model),
    )
    found = Stack(env, tmp, own_redis)
    started = [
        found.worker(kind, f"{kind}@gateway", ready=False)
        for kind in ("webhooks", "caption", "diffusion")
    ]
    for worker in started:
        worker.wait_ready(found.redis, found.store.keys.worker(worker.name))
    yield found
    found.close()


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Iterator[GatewayProcess]:
    env = {
        **stack.env,
        # As in production: a webhook to a private address is refused at submit.
        "IMAGEQ_ALLOW_PRIVATE_URLS": "0",
        "IMAGEQ_MAX_IMAGE_BYTES": str(UPLOAD_CAP),
        "IMAGEQ_GATEWAY_MAX_BODY_BYTES": "200000",
        "IMAGEQ_GATEWAY_TOKEN_CACHE_S": "0.2",
        "IMAGEQ_METRICS_PORT": str(free_port()),
        "IMAGEQ_METRICS_ADDRESS": "127.0.0.1",
    }
    process = GatewayProcess(env, stack.tmp / "logs" / "imageq.gateway.log").start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def tokens(stack: Stack) -> dict[str, str]:
    return {
        "acme": make_token(stack.redis, stack.settings, "acme"),
        "globex": make_token(stack.redis, stack.settings, "globex"),
        "small": make_token(stack.redis, stack.settings, "small", rate=0, max_in_flight=1),
        "slow": make_token(stack.redis, stack.settings, "slow", rate=0.5, max_in_flight=0),
    }


@pytest.fixture(scope="module")
def acme(gateway: GatewayProcess, tokens: dict[str, str]) -> Iterator[httpx.Client]:
    with gateway.client(tokens["acme"]) as client:
        yield client


@pytest.fixture(scope="module")
def globex(gateway: GatewayProcess, tokens: dict[str, str]) -> Iterator[httpx.Client]:
    with gateway.client(tokens["globex"]) as client:
        yield client


def submit(client: httpx.Client, body: dict[str, Any], **headers: str) -> httpx.Response:
    return client.post("/v1/jobs", json=body, headers=headers)


def final(client: httpx.Client, job_id: str, timeout_s: float = 90) -> dict[str, Any]:
    """Through the gateway: wait with Prefer until the job is final."""
    deadline = time.monotonic() + timeout_s
    while True:
        record = client.get(f"/v1/jobs/{job_id}").json()
        if record["status"] in ("succeeded", "failed", "canceled"):
            return record
        assert time.monotonic() < deadline, record
        time.sleep(0.2)


def events(client: httpx.Client, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Every server-sent event of the job's stream, until the server closes it."""
    out: list[tuple[str, dict[str, Any]]] = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name = ""
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                out.append((name, json.loads(line.split(":", 1)[1])))
    return out


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return dict(body["error"])


# -- the happy paths ----------------------------------------------------------------


def test_caption_submit_with_prefer_wait(acme: httpx.Client, stack: Stack) -> None:
    response = submit(
        acme,
        {"kind": "caption", "input": {"image": png_uri()}, "metadata": {"order": 7}},
        Prefer="wait=60",
    )
    assert response.status_code == 201, response.text
    assert response.headers["preference-applied"] == "wait=60"
    record = response.json()
    assert record["status"] == "succeeded", record
    assert record["tenant"] == "acme" and record["metadata"] == {"order": 7}
    assert record["output"]["captions"][0]["text"]
    assert response.headers["location"] == f"/v1/jobs/{record['id']}"
    # The same document Client.get returns (queue_position aside, and none once final).
    # The same record, but that a tenant never sees the storage root.
    direct = hide_storage_root(
        stack.client.get(record["id"]).to_json(), storage_root(stack.settings)
    )
    assert acme.get(f"/v1/jobs/{record['id']}").json() == direct


def test_generate_queued_then_followed_as_events(acme: httpx.Client, stack: Stack) -> None:
    response = submit(acme, {"kind": "generate", "input": {"prompt": "a red cube", **FAST}})
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["status"] == "queued" and created["kind"] == "generate"
    stream = events(acme, created["id"])
    names = [name for name, _ in stream]
    assert names[-1] == "done" and names.count("done") == 1
    assert set(names[:-1]) <= {"progress", "preview"}
    done = stream[-1][1]
    assert done["status"] == "succeeded", done
    assert len(done["output"]["images"]) == 1
    # As its tenant sees it: storage:// refs (in output and progress.preview), no root.
    direct = stack.client.get(created["id"]).to_json()
    assert done == hide_storage_root(direct, storage_root(stack.settings))
    # A job already final: its one "done" event at once, then the stream closes.
    again = events(acme, created["id"])
    assert [name for name, _ in again] == ["done"]


def test_queue_position_while_queued(globex: httpx.Client) -> None:
    # No match worker in this deployment: its jobs wait, in the order they came.
    body = {"kind": "match", "input": {"image": png_uri(), "texts": ["a cat"]}}
    jobs = [submit(globex, body).json() for _ in range(3)]
    positions = [globex.get(f"/v1/jobs/{job['id']}").json()["queue_position"] for job in jobs]
    assert positions == [0, 1, 2]
    globex.post(f"/v1/jobs/{jobs[0]['id']}/cancel")
    assert final(globex, jobs[0]["id"])["status"] == "canceled"
    # A canceled job's message stays in the list until a worker drops it.
    assert globex.get(f"/v1/jobs/{jobs[2]['id']}").json()["queue_position"] == 2
    for job in jobs[1:]:
        globex.post(f"/v1/jobs/{job['id']}/cancel")


def test_upload_raw_and_multipart_then_caption(acme: httpx.Client) -> None:
    raw = acme.post(
        "/v1/uploads",
        content=png_bytes((10, 200, 10), (64, 48)),
        headers={"Content-Type": "image/png"},
    )
    assert raw.status_code == 201, raw.text
    uploaded = raw.json()
    assert uploaded["ref"].startswith("storage://uploads/acme/")
    assert (uploaded["width"], uploaded["height"], uploaded["content_type"]) == (
        64,
        48,
        "image/png",
    )
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (0, 0, 255)).save(buffer, format="JPEG")
    multi = acme.post("/v1/uploads", files={"file": ("x.jpg", buffer.getvalue(), "image/jpeg")})
    assert multi.status_code == 201, multi.text
    assert multi.json()["content_type"] == "image/jpeg"
    record = submit(
        acme,
        {"kind": "caption", "input": {"images": [uploaded["ref"], multi.json()["ref"]]}},
        Prefer="wait=60",
    ).json()
    assert record["status"] == "succeeded", record
    assert len(record["output"]["captions"]) == 2


def test_upload_limits(acme: httpx.Client, globex: httpx.Client) -> None:
    big = os.urandom(UPLOAD_CAP + 1)
    assert_error(
        acme.post("/v1/uploads", content=big, headers={"Content-Type": "image/png"}),
        413,
        "payload_too_large",
    )
    assert_error(
        acme.post("/v1/uploads", content=bomb_png(), headers={"Content-Type": "image/png"}),
        422,
        "invalid_input",
    )
    assert_error(
        acme.post("/v1/uploads", content=b"hello", headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    assert_error(
        acme.post("/v1/uploads", content=b"not an image", headers={"Content-Type": "image/png"}),
        422,
        "invalid_input",
    )
    # One tenant cannot name another's upload in a job.
    ref = acme.post(
        "/v1/uploads", content=png_bytes(), headers={"Content-Type": "image/png"}
    ).json()["ref"]
    error = assert_error(
        submit(globex, {"kind": "caption", "input": {"image": ref}}), 422, "forbidden_url"
    )
    assert error["field"] == "input.image"


def test_list_newest_first_with_cursor_and_filters(globex: httpx.Client) -> None:
    ids = [
        submit(globex, {"kind": "caption", "input": {"image": png_uri((i, 0, 0))}}).json()["id"]
        for i in range(5)
    ]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, "kind": "caption"}
        if cursor:
            params["cursor"] = cursor
        page = globex.get("/v1/jobs", params=params).json()
        seen += [r["id"] for r in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen[:5] == list(reversed(ids))
    assert all(r["tenant"] == "globex" for r in globex.get("/v1/jobs").json()["data"])
    for job_id in ids:
        final(globex, job_id)
    done = globex.get("/v1/jobs", params={"status": "succeeded", "limit": 100}).json()["data"]
    assert set(ids) <= {r["id"] for r in done}
    assert globex.get("/v1/jobs", params={"status": "queued"}).json()["data"] == []
    assert_error(globex.get("/v1/jobs", params={"cursor": "garbage!"}), 400, "invalid_input")
    assert_error(globex.get("/v1/jobs", params={"limit": 0}), 422, "invalid_input")


def test_cancel_a_running_generate(acme: httpx.Client) -> None:
    job = submit(acme, {"kind": "generate", "input": {"prompt": "slow", **SLOW}}).json()
    wait_until(lambda: acme.get(f"/v1/jobs/{job['id']}").json()["status"] != "queued", 60, "start")
    canceled = acme.post(f"/v1/jobs/{job['id']}/cancel")
    assert canceled.status_code == 200 and canceled.json()["id"] == job["id"]
    record = final(acme, job["id"])
    assert record["status"] == "canceled" and record["error"]["code"] == "canceled"


# -- tenants, limits, idempotency ---------------------------------------------------


def test_tenants_cannot_see_each_others_jobs(acme: httpx.Client, globex: httpx.Client) -> None:
    mine = submit(acme, {"kind": "caption", "input": {"image": png_uri()}}).json()
    unknown = "00000000-0000-4000-8000-000000000000"
    for method, path in [
        ("GET", "/v1/jobs/{}"),
        ("POST", "/v1/jobs/{}/cancel"),
        ("GET", "/v1/jobs/{}/events"),
    ]:
        theirs = globex.request(method, path.format(mine["id"]))
        never = globex.request(method, path.format(unknown))
        assert theirs.status_code == never.status_code == 404
        assert theirs.json() == json.loads(never.text.replace(unknown, mine["id"]))
    assert mine["id"] not in {r["id"] for r in globex.get("/v1/jobs?limit=100").json()["data"]}
    assert final(acme, mine["id"])["status"] == "succeeded"
    # One idempotency key, two tenants: two jobs, neither sees the other's.
    key = {"Idempotency-Key": "order-1"}
    a = submit(acme, {"kind": "caption", "input": {"image": png_uri()}}, **key).json()
    b = submit(globex, {"kind": "caption", "input": {"image": png_uri()}}, **key).json()
    assert a["id"] != b["id"] and a["tenant"] == "acme" and b["tenant"] == "globex"


def test_idempotency_replay_and_conflict(acme: httpx.Client) -> None:
    body = {"kind": "caption", "input": {"image": png_uri((5, 5, 5))}}
    first = submit(acme, body, **{"Idempotency-Key": "replay-1"})
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    again = submit(acme, body, **{"Idempotency-Key": "replay-1"})
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    other = {"kind": "caption", "input": {"image": png_uri((6, 6, 6))}}
    assert_error(
        submit(acme, other, **{"Idempotency-Key": "replay-1"}), 409, "idempotency_conflict"
    )
    assert final(acme, first.json()["id"])["status"] == "succeeded"


def test_in_flight_limit_leaves_other_tenants_alone(
    gateway: GatewayProcess, tokens: dict[str, str], acme: httpx.Client
) -> None:
    with gateway.client(tokens["small"]) as small:
        held = submit(small, {"kind": "generate", "input": {"prompt": "hold", **SLOW}})
        assert held.status_code == 201, held.text
        refused = submit(small, {"kind": "caption", "input": {"image": png_uri()}})
        assert_error(refused, 429, "in_flight_limit")
        assert int(refused.headers["retry-after"]) >= 1
        # Another tenant's job still goes through, and runs.
        other = submit(acme, {"kind": "caption", "input": {"image": png_uri()}}, Prefer="wait=60")
        assert other.status_code == 201 and other.json()["status"] == "succeeded"
        # Once the held job ends, the tenant may submit again.
        small.post(f"/v1/jobs/{held.json()['id']}/cancel")
        final(small, held.json()["id"])
        again = submit(small, {"kind": "caption", "input": {"image": png_uri()}})
        assert again.status_code == 201, again.text


def test_rate_limit(gateway: GatewayProcess, tokens: dict[str, str], acme: httpx.Client) -> None:
    with gateway.client(tokens["slow"]) as slow:
        body = {"kind": "caption", "input": {"image": png_uri()}}
        assert submit(slow, body).status_code == 201
        refused = submit(slow, body)
        assert_error(refused, 429, "rate_limited")
        assert int(refused.headers["retry-after"]) >= 1
        assert submit(acme, body).status_code == 201  # another tenant, unaffected


# -- refusals -----------------------------------------------------------------------


def test_tokens_missing_wrong_and_revoked(gateway: GatewayProcess, stack: Stack) -> None:
    with gateway.client() as anonymous:
        error = assert_error(anonymous.get("/v1/jobs"), 401, "unauthorized")
        assert "Bearer" in anonymous.get("/v1/jobs").headers["www-authenticate"]
        assert error["message"]
        # Bad parameters too: no token is answered 401 before anything else is checked.
        assert_error(anonymous.get("/v1/jobs", params={"limit": "many"}), 401, "unauthorized")
    with gateway.client("iq_not-a-real-token") as wrong:
        assert_error(wrong.get("/v1/jobs"), 401, "unauthorized")
        assert_error(wrong.get("/v1/jobs", params={"limit": "many"}), 401, "unauthorized")
    token = make_token(stack.redis, stack.settings, "leaving")
    with gateway.client(token) as leaving:
        assert leaving.get("/v1/jobs").status_code == 200
        assert_error(leaving.get("/v1/jobs", params={"limit": "many"}), 422, "invalid_input")
        from imageq.gateway.tokens import TokenStore

        revoked = TokenStore(stack.redis, stack.store).revoke(token[:11])
        assert revoked == [token[:11]]
        time.sleep(0.5)  # the gateway remembers a valid token for 0.2 s here
        assert_error(leaving.get("/v1/jobs"), 401, "unauthorized")


def test_bad_requests_get_the_error_format(acme: httpx.Client) -> None:
    error = assert_error(
        submit(acme, {"kind": "caption", "input": {"images": [], "generation": {"num_beams": 99}}}),
        422,
        "invalid_input",
    )
    assert error["field"] in ("input.images", "input.generation.num_beams")
    error = assert_error(
        submit(acme, {"kind": "caption", "input": {"image": png_uri()}, "tenant": "globex"}),
        422,
        "invalid_input",
    )
    assert error["field"] == "tenant"
    assert_error(
        acme.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}),
        400,
        "invalid_input",
    )
    deep = '{"kind": "caption", "input": {"x": ' + "[" * 200 + "]" * 200 + "}}"
    assert_error(
        acme.post("/v1/jobs", content=deep.encode(), headers={"Content-Type": "application/json"}),
        400,
        "invalid_input",
    )
    for url in ("http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:9/hook"):
        error = assert_error(
            submit(acme, {"kind": "caption", "input": {"image": png_uri()}, "webhook": url}),
            422,
            "forbidden_url",
        )
        assert error["field"] == "webhook.url"
    too_big = {"kind": "caption", "input": {"image": png_uri()}, "metadata": {"x": "a" * 250_000}}
    assert_error(submit(acme, too_big), 413, "payload_too_large")
    headers = {f"X-Filler-{i}": "b" * 200 for i in range(90)}
    assert_error(acme.get("/v1/jobs", headers=headers), 431, "headers_too_large")
    assert_error(acme.get("/v1/nothing-here"), 404, "not_found")


# -- operations ---------------------------------------------------------------------


def test_openapi_health_and_metrics(gateway: GatewayProcess, acme: httpx.Client) -> None:
    document = httpx.get(gateway.url + "/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/uploads", "/healthz"} <= set(document["paths"])
    assert httpx.get(gateway.url + "/healthz").json() == {
        "status": "ok",
        "redis": "ok",
        "storage": "ok",
    }
    acme.get("/v1/jobs")
    port = gateway.env["IMAGEQ_METRICS_PORT"]
    scrape = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert (
        'imageq_gateway_requests_total{method="GET",route="/v1/jobs",status="200",tenant="acme"}'
        in scrape
    )
    assert 'route="/v1/jobs/{job_id}"' in scrape


def test_no_token_or_secret_in_logs(
    gateway: GatewayProcess, tokens: dict[str, str], stack: Stack
) -> None:
    log = gateway.log()
    assert "GET /v1/jobs" in log  # the access log is on
    for token in tokens.values():
        assert token not in log and token[11:] not in log
    assert stack.env["IMAGEQ_WEBHOOK_SECRET"] not in log


def test_a_request_past_its_deadline_gets_504(stack: Stack, tokens: dict[str, str]) -> None:
    env = {**stack.env, "IMAGEQ_GATEWAY_REQUEST_TIMEOUT_S": "1", "IMAGEQ_GATEWAY_MAX_WAIT_S": "0"}
    process = GatewayProcess(env, stack.tmp / "logs" / "gateway-deadline.log").start()
    try:
        # A client that promises a body and sends it too slowly holds nothing for long.
        with socket.create_connection(("127.0.0.1", process.port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {tokens['acme']}\r\n".encode()
                + b"Content-Length: 100\r\n\r\n{"
            )
            started = time.monotonic()
            answer = b""
            while b"}}" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 504"), answer
        assert b'"code":"timeout"' in answer
        assert time.monotonic() - started < 5
    finally:
        process.stop()


@pytest.mark.slow
def test_redis_down_answers_503_then_recovers(
    gateway: GatewayProcess, acme: httpx.Client, own_redis: RedisServer
) -> None:
    body = {"kind": "caption", "input": {"image": png_uri()}}
    own_redis.stop()
    try:
        for response in (
            submit(acme, body),
            acme.get("/v1/jobs"),
            acme.get("/v1/jobs/00000000-0000-4000-8000-000000000000"),
            httpx.get(gateway.url + "/healthz"),
        ):
            assert_error(response, 503, "unavailable")
            assert int(response.headers["retry-after"]) >= 1
    finally:
        own_redis.start()
    wait_until(lambda: httpx.get(gateway.url + "/healthz").status_code == 200, 30, "healthz")
    response = submit(acme, body, Prefer="wait=60")
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "succeeded", response.json()


def timed_events(client: httpx.Client, job_id: str) -> list[tuple[float, str, dict[str, Any]]]:
    """``events`` with the time each one arrived (monotonic)."""
    out: list[tuple[float, str, dict[str, Any]]] = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as response:
        assert response.status_code == 200
        name = ""
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                out.append((time.monotonic(), name, json.loads(line.split(":", 1)[1])))
    return out


def small(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), float)


def final_latents_preview(model: Path, seed: int, fields: dict[str, Any]) -> Image.Image:
    """What the job's last step looks like through the linear decoder: the same pipeline,
    seed and steps run here, its final latents decoded as the worker decodes previews
    (the tiny random VAE's PNG has no likeness to them: a trained VAE's would)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from imageq.workers.predictors.previews import LinearDecoder

    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.inference_mode():
        latents = pipe(
            prompt=[fields["prompt"]],
            negative_prompt=[""],
            height=fields["height"],
            width=fields["width"],
            num_inference_steps=fields["steps"],
            generator=[generator],
            output_type="latent",
        ).images
    return LinearDecoder().decode(latents[0])


def test_generate_previews_over_the_event_stream(
    acme: httpx.Client, stack: Stack, tiny_sd_model: Path
) -> None:
    fields = {"prompt": "a red cube", **SLOW, "seed": 11}
    created = submit(acme, {"kind": "generate", "input": fields}).json()
    stream = timed_events(acme, created["id"])
    assert stream[-1][1] == "done" and stream[-1][2]["status"] == "succeeded"
    previews = [(at, data) for at, name, data in stream if name == "preview"]
    assert len(previews) >= 3, [name for _, name, _ in stream]
    images = [Image.open(io.BytesIO(base64.b64decode(d["image"]))) for _, d in previews]
    for (_, data), image in zip(previews, images, strict=True):
        assert image.format == "JPEG" and max(image.size) <= 256
        # The tenant sees its own job's key, never the storage root.
        assert data["uri"] == f"storage://jobs/{created['id']}/preview.jpg"
        assert data["total"] >= SLOW["steps"] and data["media_type"] == "image/jpeg"
    steps = [d["step"] for _, d in previews]
    assert steps == sorted(set(steps))
    # The throttle (IMAGEQ_PREVIEW_INTERVAL_MS, 500 by default) holds at the client too;
    # 150 ms for the gateway's own delivery jitter on this shared machine.
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(previews)]
    assert min(gaps) >= 0.5 - 0.15, gaps
    # Images of the job's latents: the last close to its final latents, the first far.
    reference = small(final_latents_preview(tiny_sd_model, 11, fields))
    last = float(np.abs(small(images[-1]) - reference).mean())
    first = float(np.abs(small(images[0]) - reference).mean())
    # Measured: 12 previews, steps 1..150, gaps 0.51-0.535 s, first 41.1 and last 5.2 levels.
    assert last < 12 and first > 3 * last, (first, last)


def test_previews_false_sends_none(acme: httpx.Client) -> None:
    fields = {"prompt": "a red cube", "width": 256, "height": 256, "steps": 40, "previews": False}
    created = submit(acme, {"kind": "generate", "input": fields}).json()
    stream = timed_events(acme, created["id"])
    names = [name for _, name, _ in stream]
    assert names[-1] == "done" and "preview" not in names
    done = stream[-1][2]
    assert done["status"] == "succeeded" and "preview" not in done["progress"]
