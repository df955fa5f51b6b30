"""The gateway against its own OpenAPI document: schemathesis generates requests from
the schema (valid ones and invalid ones) and sends them to the running server.

Every answer must be documented: no 5xx, a status code the operation lists, the
content type it lists, a body that validates against the listed schema, and a refusal
of requests that leave the token out. Bounded (a few hundred requests in all) so it
runs in CI with the rest of the suite.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import checks
from schemathesis.specs.openapi import checks as openapi_checks

from imageq.workers.testing.services import RedisServer
from tests.fixtures.gateway import GatewayProcess, make_token
from tests.fixtures.services import service_env

pytestmark = pytest.mark.slow

# Per operation and mode (valid and invalid data): some 500 requests in all.
EXAMPLES_PER_OPERATION = 40


@pytest.fixture(scope="module")
def fuzz_gateway(
    tmp_path_factory: pytest.TempPathFactory, webhook_secret: str
) -> Iterator[tuple[GatewayProcess, str]]:
    tmp = tmp_path_factory.mktemp("gateway-fuzz")
    redis_server = RedisServer(tmp / "redis", appendonly=False).start()
    env = service_env(
        redis_server.url,
        f"file://{tmp / 'storage'}",
        webhook_secret,
        f"fuzz-{os.getpid()}-",
        # Generated webhook hosts must not turn into DNS lookups; waits and streams
        # end within a second (no worker ever finishes these jobs).
        IMAGEQ_ALLOW_PRIVATE_URLS="1",
        IMAGEQ_GATEWAY_MAX_WAIT_S="1",
        IMAGEQ_GATEWAY_STREAM_MAX_S="1",
        IMAGEQ_GATEWAY_OPENAI_WAIT_S="1",
    )
    from imageq.api_client.records import connect
    from imageq.api_client.settings import Settings

    client = connect(redis_server.url)
    token = make_token(client, Settings.from_env(env), "fuzz")
    client.close()
    process = GatewayProcess(env, Path(tmp) / "imageq.gateway.log").start()
    try:
        yield process, token
    finally:
        process.stop()
        redis_server.stop()


CHECKS = [
    checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.ignored_auth,
]


def test_gateway_matches_its_openapi_document(fuzz_gateway: tuple[GatewayProcess, str]) -> None:
    process, token = fuzz_gateway
    schema = schemathesis.openapi.from_url(process.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7
    failures: list[str] = []
    counted = {"requests": 0}

    runs = [(op, mode) for op in operations for mode in schemathesis.GenerationMode]
    for operation, mode in runs:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def run(case: schemathesis.Case) -> None:
            counted["requests"] += 1
            images = case.path.startswith("/v1/images/")
            response = case.call_and_validate(
                base_url=process.url,
                headers={"Authorization": f"Bearer {token}"},
                checks=CHECKS,
                # No worker ever runs these jobs: an images call that submits one waits
                # IMAGEQ_GATEWAY_OPENAI_WAIT_S and answers its documented 504, by design.
                excluded_checks=[checks.not_a_server_error] if images else None,
                timeout=30,
            )
            if images and response.status_code >= 500:
                assert response.status_code == 504, response.text
                assert response.json()["error"]["code"] == "timeout", response.text

        try:
            run()
        except Unsatisfiable:
            # No invalid request can be made (an operation without parameters or body).
            assert mode is schemathesis.GenerationMode.NEGATIVE
        except Exception as exc:  # one operation's failure must not hide the others'
            failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)
    assert counted["requests"] >= 300
