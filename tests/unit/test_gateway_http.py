"""The gateway's request parsing, error mapping and OpenAPI document (no services)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from typing import Any

import pytest

from imageq.api_client.client import document_fingerprint
from imageq.api_client.errors import (
    ForbiddenUrl,
    IdempotencyConflict,
    ImageqError,
    InputFetchFailed,
    InvalidInput,
    TransientError,
)
from imageq.api_client.job_ids import IDEMPOTENCY_NAMESPACE, job_id_for
from imageq.api_client.schemas import parse_job
from imageq.api_client.settings import Settings
from imageq.api_client.uploads import ref_key, sniff_format
from imageq.gateway.app import create_app
from imageq.gateway.cli import _tokens_parser
from imageq.gateway.errors import (
    Malformed,
    PayloadTooLarge,
    RateLimited,
    UnsupportedMediaType,
    field_of,
    response_for,
    status_for,
)
from imageq.gateway.files import probe
from imageq.gateway.jobs import json_depth, parse_body, prefer_wait
from imageq.gateway.openai_compat import OPENAI_PATHS
from tests.helpers import png_bytes

JSON = "application/json"


def test_parse_body_accepts_a_job_object() -> None:
    body = parse_body(b'{"kind": "caption", "input": {}}', JSON, 32)
    assert body == {"kind": "caption", "input": {}}
    assert parse_body(b'{"kind": "x"}', "application/json; charset=utf-8", 32)["kind"] == "x"
    assert parse_body(b'{"kind": "x"}', None, 32) == {"kind": "x"}


@pytest.mark.parametrize(
    ("raw", "ctype", "error"),
    [
        (b"", JSON, Malformed),
        (b"{nope", JSON, Malformed),
        (b'{"a": NaN}', JSON, Malformed),
        (b"\xff\xfe\x00", JSON, Malformed),
        (b'{"x": ' + b"[" * 40 + b"]" * 40 + b"}", JSON, Malformed),
        (b"[" * 100_000 + b"]" * 100_000, JSON, Malformed),
        (b"[1]", JSON, InvalidInput),
        (b'{"kind": "caption", "tenant": "other"}', JSON, InvalidInput),
        (b'{"kind": "caption"}', "text/html", UnsupportedMediaType),
    ],
)
def test_parse_body_refuses(raw: bytes, ctype: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_body(raw, ctype, 32)


def test_json_depth_counts_without_recursion() -> None:
    assert json_depth(1) == 1
    assert json_depth({"a": [1, {"b": []}]}) == 4
    deep: Any = []
    for _ in range(50_000):
        deep = [deep]
    assert json_depth(deep) == 50_001


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("wait=5", 5.0),
        ("respond-async, wait=10", 10.0),
        ("wait=600", 60.0),
        ('wait="3"', 3.0),
        ("wait=abc", None),
        ("wait=0", None),
        ("wait=nan", None),
        ("handling=lenient", None),
    ],
)
def test_prefer_wait(header: str | None, expected: float | None) -> None:
    assert prefer_wait(header, 60.0) == expected


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (InvalidInput("input.images[0]: bad"), 422, "invalid_input"),
        (Malformed("body: not JSON"), 400, "invalid_input"),
        (ForbiddenUrl("webhook.url: private"), 422, "forbidden_url"),
        (InputFetchFailed("webhook.url: could not resolve"), 422, "invalid_input"),
        (IdempotencyConflict("idempotency_key: used"), 409, "idempotency_conflict"),
        (PayloadTooLarge("body: big"), 413, "payload_too_large"),
        (RateLimited("slow down", {"Retry-After": "2"}), 429, "rate_limited"),
        (
            TransientError("upload to s3://private-bucket/k: EndpointConnectionError"),
            503,
            "unavailable",
        ),
        (ImageqError("what"), 500, "internal"),
    ],
)
def test_errors_map_to_statuses_in_one_format(error: ImageqError, status: int, code: str) -> None:
    assert status_for(error) == status
    response = response_for(error)
    assert response.status_code == status
    body = json.loads(bytes(response.body))
    assert set(body) == {"error"} and body["error"]["code"] == code
    if status == 500:
        # Nothing of the exception: an error id the operator finds in the log.
        assert re.fullmatch(r"internal error \(error id [0-9a-f]{12}\)", body["error"]["message"])
    if status == 503:
        assert body["error"]["message"] == "a dependency is unavailable; retry shortly"
    if status in (429, 503):
        assert int(response.headers["retry-after"]) >= 1


def test_field_of_reads_the_first_path() -> None:
    assert field_of("input.images[0]: bad; input.prompt: bad") == "input.images[0]"
    assert field_of("webhook.url: private address") == "webhook.url"
    assert field_of("document: a job must be an object") is None
    assert field_of("something went wrong") is None


def test_idempotency_ids_and_fingerprints() -> None:
    secret = b"s" * 32
    assert job_id_for("k") == job_id_for("k") != job_id_for("k", "acme", secret)
    assert job_id_for("k", "acme", secret) != job_id_for("k", "globex", secret)
    doc = parse_job({"id": "a", "kind": "caption", "input": {"image": "https://x/y.png"}}).wire()
    same = parse_job({"id": "b", "kind": "caption", "input": {"images": ["https://x/y.png"]}})
    assert document_fingerprint(doc) == document_fingerprint(same.wire())
    other = {**doc, "priority": 9}
    assert document_fingerprint(doc) != document_fingerprint(other)


def test_tenant_job_ids_need_the_deployments_secret() -> None:
    # Same secret, same id (every producer of a deployment agrees); another secret,
    # another id: knowing a tenant's name and key is not enough to compute its job id.
    one, other = b"a" * 32, b"b" * 32
    assert job_id_for("order-1", "acme", one) == job_id_for("order-1", "acme", one)
    assert job_id_for("order-1", "acme", one) != job_id_for("order-1", "acme", other)
    # Not the old public derivation either (uuid5 of a published namespace).
    public = uuid.uuid5(uuid.uuid5(IDEMPOTENCY_NAMESPACE, "tenant:acme"), "order-1")
    assert job_id_for("order-1", "acme", one) != str(public)
    # Shaped as a uuid still (ids keep their pattern and length).
    parsed = uuid.UUID(job_id_for("order-1", "acme", one))
    assert parsed.version == 8 and str(parsed) == job_id_for("order-1", "acme", one)
    # Lengths are part of the message: ("ab", "c") is not ("a", "bc").
    assert job_id_for("c", "ab", one) != job_id_for("bc", "a", one)
    with pytest.raises(ValueError, match="secret"):
        job_id_for("order-1", "acme")


def test_upload_sniffing_and_refs() -> None:
    assert sniff_format(png_bytes()) == "PNG"
    assert sniff_format(b"GIF89a....") == "GIF"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WEBP"
    assert sniff_format(b"<html>") is None
    assert ref_key("storage://uploads/acme/x.png") == "uploads/acme/x.png"
    for bad in ("storage://jobs/x", "storage://uploads/../x", "storage://uploads//x", "s3://b/k"):
        with pytest.raises(InvalidInput):
            ref_key(bad)


def test_probe_checks_format_and_pixels() -> None:
    assert probe(png_bytes(size=(30, 20)), 10_000) == ("PNG", 30, 20)
    with pytest.raises(InvalidInput, match="pixels"):
        probe(png_bytes(size=(300, 200)), 10_000)
    with pytest.raises(InvalidInput, match="not a JPEG"):
        probe(b"GIF89a-but-not-really", 10_000)


def test_openapi_document_describes_every_route_in_one_error_format() -> None:
    document = create_app(Settings()).openapi()
    assert set(document["paths"]) == {
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/files/{name}",
        "/v1/uploads",
        "/v1/usage",
        "/healthz",
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/images/variations",
        "/v1/models",
    }
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    for name in ("SubmitCaption", "SubmitGenerate", "CaptionInput", "JobOut", "ErrorOut"):
        assert name in schemas
    submit = document["paths"]["/v1/jobs"]["post"]
    body = submit["requestBody"]["content"]["application/json"]["schema"]
    assert body["discriminator"]["propertyName"] == "kind"
    assert {"201", "200", "409", "429", "503"} <= set(submit["responses"])
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, operations in document["paths"].items():
        for operation in operations.values():
            for status, answer in operation["responses"].items():
                if status.startswith(("4", "5")):
                    schema = answer["content"]["application/json"]["schema"]
                    # The OpenAI-compatible routes answer in OpenAI's error shape.
                    shape = "OpenAIErrorOut" if path.startswith(OPENAI_PATHS) else "ErrorOut"
                    assert schema == {"$ref": f"#/components/schemas/{shape}"}, (path, status)


def test_the_gateway_imports_no_model_stack() -> None:
    """`imageq gateway` runs on the light server install: no torch, no tasks."""
    code = (
        "import sys, workers.ops.cli, gateway.cli\n"
        "from gateway.app import create_app\n"
        "from api_client.settings import Settings\n"
        "create_app(Settings()).openapi()\n"
        "heavy = {'torch', 'transformers', 'diffusers', 'peft', 'tasks'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_tokens_create_takes_a_max_priority() -> None:
    args = _tokens_parser().parse_args(["create", "acme", "--max-priority", "7"])
    assert args.max_priority == 7
    assert _tokens_parser().parse_args(["create", "acme"]).max_priority is None
    assert Settings().gateway_default_max_priority == 5
