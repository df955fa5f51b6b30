"""The official ``openai`` client, pointed at a real gateway process (``base_url``), with a
real diffusion worker on the tiny SD pipeline: generate, edit, errors and limits.

Run from a worktree with ``PYTHONPATH=$PWD`` so that the subprocesses import it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from imageq.workers.testing.services import RedisServer, free_port
from tests.fixtures.gateway import GatewayProcess, make_token
from tests.fixtures.services import Stack, service_env

# Tiny-model jobs: 3 steps at 64x64 end in well under a second each.
FAST = {"steps": 3, "seed": 3}
_n = itertools.count()
# Not WxH; not multiples of 8 (Any: the client's types allow OpenAI's sizes only).
BAD_SIZES: list[Any] = ["banana", "100x100"]


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("openai-redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(
    own_redis: RedisServer,
    webhook_secret: str,
    tiny_sd_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("openai-stack")
    env = service_env(
        own_redis.url,
        f"file://{tmp / 'storage'}",
        webhook_secret,
        f"oa{next(_n)}-{os.getpid()}-",
        IMAGEQ_MODEL_DIFFUSION=str(tiny_sd_model),
    )
    found = Stack(env, tmp, own_redis)
    found.worker("diffusion", "sd@openai")
    yield found
    found.close()


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Iterator[GatewayProcess]:
    env = {
        **stack.env,
        "IMAGEQ_GATEWAY_OPENAI_MODELS": "imageq-sd,other",
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
        # One job per 100 s: the second call within the test is over the rate.
        "slow": make_token(stack.redis, stack.settings, "slow", rate=0.01, max_in_flight=0),
    }


def client(gateway: GatewayProcess, token: str) -> openai.OpenAI:
    # No retries: a 429 must reach the test, not be waited out by the client.
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=token, max_retries=0, timeout=90)


def png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    """The ``error`` object of OpenAI's shape, as the client parsed it."""
    assert isinstance(exc.body, dict) and set(exc.body) == {"message", "type", "param", "code"}
    return exc.body


def noise_png(size: tuple[int, int]) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_generate_two_pngs_of_the_asked_size_as_b64(
    gateway: GatewayProcess, tokens: dict[str, str], stack: Stack
) -> None:
    result = client(gateway, tokens["acme"]).images.generate(
        prompt="a red cube",
        n=2,
        size="64x72",
        response_format="b64_json",
        extra_body=FAST,
    )
    assert len(result.data) == 2
    images = [png(item.b64_json or "") for item in result.data]
    assert [(im.format, im.size) for im in images] == [("PNG", (64, 72))] * 2
    assert images[0].tobytes() != images[1].tobytes()  # seeds 3 and 4
    # A job like any other: the tenant's, with its usage.
    jobs = stack.client.list_page(None, "generate", 10, None, "acme")[0]
    assert jobs and jobs[0].tenant == "acme" and jobs[0].output is not None


def test_generate_urls_are_fetchable_by_their_tenant_only(
    gateway: GatewayProcess, tokens: dict[str, str]
) -> None:
    result = client(gateway, tokens["acme"]).images.generate(
        prompt="a red cube", size="64x64", response_format="url", extra_body=FAST
    )
    url = result.data[0].url or ""
    assert url.startswith(gateway.url + "/v1/jobs/")
    own = httpx.get(url, headers={"Authorization": f"Bearer {tokens['acme']}"})
    assert own.status_code == 200 and own.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(own.content)).size == (64, 64)
    # Another tenant hears what an unknown job gets: 404, in imageq's own error shape.
    other = httpx.get(url, headers={"Authorization": f"Bearer {tokens['globex']}"})
    unknown = httpx.get(
        gateway.url + "/v1/jobs/nope/files/image-0.png",
        headers={"Authorization": f"Bearer {tokens['globex']}"},
    )
    assert other.status_code == unknown.status_code == 404
    assert other.json()["error"]["code"] == "not_found"
    assert (
        other.json()["error"]["message"].replace(url.split("/")[-3], "nope")
        == (unknown.json()["error"]["message"])
    )


def test_edit_with_a_mask_repaints_the_transparent_part(
    gateway: GatewayProcess, tokens: dict[str, str]
) -> None:
    original = noise_png((64, 64))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))  # transparent left half: repainted
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    result = client(gateway, tokens["acme"]).images.edit(
        image=("photo.png", original, "image/png"),
        mask=("mask.png", buffer.getvalue(), "image/png"),
        prompt="a cat",
        size="64x64",
        response_format="b64_json",
        extra_body={"steps": 3, "seed": 3},
    )
    edited = np.asarray(png(result.data[0].b64_json or "").convert("RGB"), dtype=np.int16)
    source = np.asarray(Image.open(io.BytesIO(original)).convert("RGB"), dtype=np.int16)
    assert edited.shape == source.shape
    kept = np.abs(edited[:, 32:] - source[:, 32:]).mean()
    repainted = np.abs(edited[:, :32] - source[:, :32]).mean()
    # The worker pastes the input's own pixels back outside the mask (keep_unmasked):
    # without it, the tiny VAE's round trip left a mean difference of 65 there.
    assert kept == 0.0
    assert repainted > 20.0


def test_async_client_generates(gateway: GatewayProcess, tokens: dict[str, str]) -> None:
    async def run() -> list[Image.Image]:
        async with openai.AsyncOpenAI(
            base_url=gateway.url + "/v1", api_key=tokens["acme"], max_retries=0, timeout=90
        ) as aclient:
            first, second = await asyncio.gather(
                *(
                    aclient.images.generate(
                        prompt="a blue sphere",
                        size="64x64",
                        response_format="b64_json",
                        extra_body={"steps": 3, "seed": seed},
                    )
                    for seed in (1, 2)
                )
            )
        return [png(r.data[0].b64_json or "") for r in (first, second)]

    images = asyncio.run(run())
    assert [im.size for im in images] == [(64, 64)] * 2


def test_models_lists_the_aliases(gateway: GatewayProcess, tokens: dict[str, str]) -> None:
    listed = client(gateway, tokens["acme"]).models.list()
    assert [m.id for m in listed.data] == ["imageq-sd", "other"]


def test_errors_are_the_clients_own_exceptions(
    gateway: GatewayProcess, tokens: dict[str, str]
) -> None:
    acme = client(gateway, tokens["acme"])
    with pytest.raises(openai.BadRequestError) as bad_size:
        acme.images.generate(prompt="x", size=BAD_SIZES[0], extra_body=FAST)
    assert bad_size.value.code == "invalid_input" and error_of(bad_size.value)["param"] == "size"
    with pytest.raises(openai.BadRequestError):
        acme.images.generate(prompt="x", size=BAD_SIZES[1], extra_body=FAST)
    with pytest.raises(openai.BadRequestError) as streamed:
        acme.images.generate(prompt="x", size="64x64", stream=True, extra_body=FAST)
    assert error_of(streamed.value)["message"].startswith("stream: ")
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "not-a-token").images.generate(prompt="x", size="64x64")
    slow = client(gateway, tokens["slow"])
    slow.images.generate(prompt="x", size="64x64", response_format="b64_json", extra_body=FAST)
    with pytest.raises(openai.RateLimitError) as limited:
        slow.images.generate(prompt="x", size="64x64", extra_body=FAST)
    assert limited.value.code == "rate_limited"
    assert limited.value.response.headers["retry-after"]
    # The native API keeps its own error shape.
    native = httpx.get(gateway.url + "/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert native.status_code == 401 and set(native.json()["error"]) == {"code", "message"}


def test_edit_without_a_mask_styles_and_variations_need_ip_adapter(
    gateway: GatewayProcess, tokens: dict[str, str], stack: Stack
) -> None:
    acme = client(gateway, tokens["acme"])
    styled = acme.images.edit(
        image=("photo.png", noise_png((72, 64)), "image/png"),
        prompt="oil painting",
        response_format="b64_json",
        extra_body={"steps": 4, "seed": 5},
    )
    assert png(styled.data[0].b64_json or "").size == (72, 64)
    job = stack.client.list_page(None, "style", 1, None, "acme")[0][0]
    assert job.output is not None and job.output["parameters"]["prompt"] == "oil painting"
    # The images went in as the tenant's own uploads.
    assert stack.redis.get(stack.store.keys.job(job.id)) is not None
    with pytest.raises(openai.BadRequestError) as size:
        acme.images.edit(
            image=("p.png", noise_png((72, 64)), "image/png"), prompt="x", size="64x64"
        )
    assert "72x64" in error_of(size.value)["message"]
    # A variation is the image styled towards itself through IP-Adapter, which this
    # worker lacks: the job fails on its input, a 400 saying so.
    with pytest.raises(openai.BadRequestError) as variation:
        acme.images.create_variation(
            image=("photo.png", noise_png((64, 64)), "image/png"), extra_body={"steps": 4}
        )
    assert "IP-Adapter" in error_of(variation.value)["message"]


def test_a_job_past_the_wait_is_a_504_naming_it(stack: Stack, tokens: dict[str, str]) -> None:
    env = {**stack.env, "IMAGEQ_GATEWAY_OPENAI_WAIT_S": "0.5"}
    process = GatewayProcess(env, stack.tmp / "logs" / "gateway-short.log").start()
    try:
        short = client(process, tokens["globex"])
        with pytest.raises(openai.InternalServerError) as timed_out:
            short.images.generate(prompt="x", size="256x256", extra_body={"steps": 150, "seed": 1})
        assert timed_out.value.status_code == 504 and timed_out.value.code == "timeout"
        error = error_of(timed_out.value)
        assert error["type"] == "server_error"
        job_id = error["message"].split()[1]  # "job ID did not finish within 0.5 s; ..."
        assert timed_out.value.response.headers["x-should-retry"] == "false"
        native = httpx.Client(
            base_url=process.url, headers={"Authorization": f"Bearer {tokens['globex']}"}
        )
        with native:
            record = native.get(f"/v1/jobs/{job_id}").json()
            assert record["kind"] == "generate" and record["tenant"] == "globex"
            assert record["status"] in ("queued", "running")
            native.post(f"/v1/jobs/{job_id}/cancel")
        assert stack.client.wait(job_id, 30).status == "canceled"
    finally:
        process.stop()
