"""Security promises, end to end: authenticated TLS Redis, nothing secret in task
arguments, logs or task events (what Flower shows), webhook secret rotation, and model
weights from safetensors only.

Flower itself (``imageq flower`` refuses to start without basic auth and answers 401
without it) is tested in tests/e2e/test_flower.py. The URL guard's e2e cases (every
address a name resolves to, re-checks after redirects) are in test_bad_input_corpus.py.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from standardwebhooks.webhooks import Webhook

from imageq.api_client.job_ids import job_id_for
from imageq.api_client.webhooks import WebhookVerificationError, new_secret, verify
from imageq.workers.testing.services import RedisServer, TlsFiles, WebhookReceiver, wait_until
from tests.fixtures.services import Stack, service_env
from tests.helpers import data_uri, png_bytes, png_uri

REDIS_PASSWORD = "r3dis-Pa55:w/rd"
HOOK_PASSWORD = "hook-pa55word"
HOOK_TOKEN = "tok_9f8e7d6c5b4a"
OLD_SECRET = new_secret()
NEW_SECRET = new_secret()


def self_signed(directory: Path) -> TlsFiles:
    """A self-signed certificate for 127.0.0.1, trusted by the clients as their CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imageq-test-redis")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "redis.crt", directory / "redis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return TlsFiles(cert=cert_path, key=key_path, ca=cert_path)


@pytest.fixture(scope="module")
def secure_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    tmp = tmp_path_factory.mktemp("secure-redis")
    server = RedisServer(tmp / "data", password=REDIS_PASSWORD, tls=self_signed(tmp / "tls"))
    server.start()
    yield server
    server.stop()


class EventTap:
    """Celery task events as Flower receives them (task-sent, task-received, ...)."""

    def __init__(self, broker_url: str) -> None:
        self.app = Celery("tap", broker=broker_url, set_as_current=False)
        self.events: list[dict[str, Any]] = []
        self.receiver: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.app.connection() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"*": self.events.append})
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def start(self) -> EventTap:
        self._thread.start()
        # Listening once a worker heartbeat arrives (every 2 s).
        wait_until(lambda: bool(self.events), 30, "the first task event")
        return self

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self._thread.join(10)
        self.app.close()


@pytest.fixture(scope="module")
def secure(
    secure_redis: RedisServer,
    tiny_caption_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """A deployment on TLS Redis with a password, signing with two secrets (rotation)."""
    tmp = tmp_path_factory.mktemp("secure-stack")
    env = service_env(
        secure_redis.url,
        f"file://{tmp / 'storage'}",
        NEW_SECRET,
        f"sec-{os.getpid()}-",
        IMAGEQ_MODEL_CAPTION=str(tiny_caption_model),
        IMAGEQ_WEBHOOK_EXTRA_SECRETS=OLD_SECRET,
    )
    stack = Stack(env, tmp, secure_redis)
    stack.worker("webhooks", "webhooks@secure")
    stack.worker("caption", "caption@secure")
    yield stack
    stack.close()


def test_rediss_with_a_password_serves_jobs_and_refuses_strangers(
    secure: Stack, secure_redis: RedisServer, receiver: WebhookReceiver
) -> None:
    assert secure.settings.broker_url.startswith("rediss://:")
    job = secure.client.caption(image=png_uri(), webhook=receiver.url("/tls"))
    record = secure.client.wait(job.id, 60)
    assert record.status == "succeeded", record.error
    receiver.wait_for(lambda d: d.path == "/tls" and d.json()["data"]["id"] == job.id)
    # No plain-text port, and TLS without the password gets nothing.
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=secure_redis.port, socket_timeout=2, socket_connect_timeout=2).ping()
    anonymous = secure_redis.url.split("//", 1)[0] + "//" + secure_redis.url.split("@", 1)[1]
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(anonymous).get("anything")


def test_password_redis_without_tls(
    make_stack: Callable[..., Stack],
    tmp_path_factory: pytest.TempPathFactory,
    receiver: WebhookReceiver,
) -> None:
    server = RedisServer(tmp_path_factory.mktemp("pw-redis"), password=REDIS_PASSWORD).start()
    try:
        stack = make_stack(IMAGEQ_BROKER_URL=server.url)
        stack.worker("webhooks", "webhooks@password")
        # A job canceled while queued is finalized by the webhooks worker: records,
        # broker and delivery all go through the password-protected server.
        job = stack.client.caption(image=png_uri(), webhook=receiver.url("/password"))
        assert stack.client.cancel(job.id).status == "canceled"
        found = receiver.wait_for(lambda d: d.path == "/password")
        assert found[0].json()["type"] == "job.canceled"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).get("anything")
        stack.close()
    finally:
        server.stop()


def test_webhook_secret_rotation_signs_with_both_secrets(
    secure: Stack, receiver: WebhookReceiver
) -> None:
    job = secure.client.caption(image=png_uri((5, 6, 7)), webhook=receiver.url("/rotation"))
    assert secure.client.wait(job.id, 60).status == "succeeded"
    delivery = receiver.wait_for(lambda d: d.path == "/rotation")[0]
    signatures = delivery.headers["webhook-signature"].split()
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    # A consumer holding either secret accepts it, with imageq's verify and the
    # independent standardwebhooks package alike; one holding neither does not.
    for secret in (OLD_SECRET, NEW_SECRET):
        assert verify(delivery.headers, delivery.body, secret)["data"]["id"] == job.id
        assert Webhook(secret).verify(delivery.body, delivery.headers)["type"] == "job.succeeded"
    with pytest.raises(WebhookVerificationError):
        verify(delivery.headers, delivery.body, new_secret())


def _secrets(image: str) -> dict[str, str]:
    payload = image.split(",", 1)[1]
    return {
        "inline image": payload[len(payload) // 2 : len(payload) // 2 + 48],
        "webhook URL password": HOOK_PASSWORD,
        "webhook URL token": HOOK_TOKEN,
        "redis password": REDIS_PASSWORD,
        "webhook secret": NEW_SECRET.removeprefix("whsec_"),
        "old webhook secret": OLD_SECRET.removeprefix("whsec_"),
    }


def _leaks(text: str, secrets: dict[str, str]) -> list[str]:
    return [what for what, value in secrets.items() if value in text]


def test_no_secret_in_task_arguments_logs_or_events(
    secure: Stack, receiver: WebhookReceiver
) -> None:
    image = data_uri(png_bytes((77, 1, 200), (120, 90)))
    secrets = _secrets(image)
    hook = f"http://hookuser:{HOOK_PASSWORD}@127.0.0.1:{receiver.port}/secret?token={HOOK_TOKEN}"
    tap = EventTap(secure.settings.broker_url).start()
    try:
        # Someone else holds the job's lease for a moment: the worker defers it, so a
        # retried message (sent by the worker, not the client) is checked too.
        key = "secret-job-1"
        job_id = job_id_for(key)
        secure.redis.set(secure.store.keys.lease(job_id), "elsewhere", px=1500)
        job = secure.client.caption(image=image, webhook=hook, idempotency_key=key)
        assert job.id == job_id
        assert secure.client.wait(job.id, 60).status == "succeeded"
        receiver.wait_for(lambda d: d.path.startswith("/secret"))
        # A job no worker takes stays in its queue: read the message as the broker has it.
        parked = secure.client.match(image=image, texts=["a"], webhook=hook)
        time.sleep(2.5)
    finally:
        tap.stop()

    sent = [e for e in tap.events if e.get("type") == "task-sent"]
    ours = [e for e in sent if e.get("uuid") == job.id]
    assert len(ours) >= 2, "the deferred job was not re-sent by the worker"
    assert any(e.get("name") == "imageq.webhook" for e in sent)
    assert all("bytes)" in e["args"] for e in ours)  # the image shows as a size note
    events = json.dumps(tap.events)
    assert _leaks(events, secrets) == []

    queue_keys = list(secure.redis.scan_iter(secure.settings.queue_prefix + "match*"))
    messages = [json.loads(m) for k in queue_keys for m in secure.redis.lrange(k, 0, -1)]
    mine = [m for m in messages if m["headers"]["id"] == parked.id]
    assert len(mine) == 1
    assert _leaks(mine[0]["headers"]["argsrepr"], secrets) == []
    assert secrets["inline image"] in base64.b64decode(mine[0]["body"]).decode()

    for worker in secure.workers:
        log = worker.log_path.read_text(errors="replace")
        assert job.id in log or worker.kind == "webhooks"
        assert _leaks(log, secrets) == [], worker.name


@pytest.mark.parametrize("kind", ["caption", "diffusion"])
def test_models_load_from_safetensors_only(
    kind: str,
    make_stack: Callable[..., Stack],
    tiny_caption_model: Path,
    tiny_sd_model: Path,
    tmp_path: Path,
) -> None:
    """The same checkpoint as pickles (``*.bin``) only: the worker refuses it and exits 3."""
    import torch
    from safetensors.torch import load_file

    source = tiny_caption_model if kind == "caption" else tiny_sd_model
    pickled = tmp_path / "pickled"
    shutil.copytree(source, pickled)
    for weights in pickled.rglob("*.safetensors"):
        name = "pytorch_model.bin" if weights.name == "model.safetensors" else weights.stem + ".bin"
        torch.save(load_file(weights), weights.with_name(name))
        weights.unlink()
    # Not vacuous: the pickles are a loadable checkpoint when pickles are allowed.
    if kind == "caption":
        from transformers import BlipForConditionalGeneration

        BlipForConditionalGeneration.from_pretrained(pickled, use_safetensors=False)
    else:
        from diffusers import UNet2DConditionModel

        UNet2DConditionModel.from_pretrained(pickled, subfolder="unet", use_safetensors=False)

    stack = make_stack(**{f"IMAGEQ_MODEL_{kind.upper()}": str(pickled)})
    worker = stack.worker(kind, f"{kind}-pickles@test", ready=False)
    assert worker.process is not None
    assert worker.process.wait(120) == 3
    log = worker.log_path.read_text(errors="replace")
    assert "model_error" in log and "safetensors" in log, log[-2000:]
    assert not stack.redis.exists(stack.store.keys.worker(worker.name))
