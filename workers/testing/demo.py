"""``imageq demo``: one caption job end to end, with everything it needs started here.

Starts a private redis-server unless ``IMAGEQ_BROKER_URL`` is set, a caption worker, a
webhooks worker and a local webhook receiver; submits the bundled sample image; prints
the caption, where the result lies and the verified webhook; stops what it started.
"""

from __future__ import annotations

import base64
import tempfile
import time
from pathlib import Path

from imageq.api_client.client import Client
from imageq.api_client.errors import ImageqError
from imageq.api_client.records import connect
from imageq.api_client.settings import Settings, is_configured, process_environment
from imageq.api_client.webhooks import new_secret, verify
from imageq.workers.testing.services import RedisServer, WebhookReceiver, WorkerProcess

SAMPLE = Path(__file__).parent / "assets" / "sample.png"


def sample_data_uri() -> str:
    return "data:image/png;base64," + base64.b64encode(SAMPLE.read_bytes()).decode()


def run_demo(*, tiny: bool, timeout_s: float = 600) -> int:
    env = process_environment()
    started: list[RedisServer | WorkerProcess | WebhookReceiver] = []
    with tempfile.TemporaryDirectory(prefix="imageq-demo-") as tmp_dir:
        tmp = Path(tmp_dir)
        try:
            if not is_configured("broker_url"):
                redis_server = RedisServer(tmp / "redis").start()
                started.append(redis_server)
                env["IMAGEQ_BROKER_URL"] = redis_server.url
                print(f"started a private redis-server at {redis_server.url}")
            if tiny:
                from imageq.workers.testing.tiny import build_tiny_caption

                env["IMAGEQ_MODEL_CAPTION"] = str(build_tiny_caption(tmp / "tiny-caption"))
                print(
                    "--tiny: a tiny, randomly initialised BLIP of the real architecture; "
                    "its captions are MEANINGLESS words, it only proves the path works"
                )
            receiver = WebhookReceiver().start()
            started.append(receiver)
            secret = env.get("IMAGEQ_WEBHOOK_SECRET") or new_secret()
            env["IMAGEQ_WEBHOOK_SECRET"] = secret
            # The receiver listens on loopback, which the URL guard refuses by default.
            env["IMAGEQ_ALLOW_PRIVATE_URLS"] = "1"
            settings = Settings.from_env(env)
            print(f"model: {settings.model_caption}; storage: {settings.storage_url}")
            redis_client = connect(settings.records_redis_url)
            workers = [
                WorkerProcess("caption", env, "caption@demo", tmp / "caption.log"),
                WorkerProcess("webhooks", env, "webhooks@demo", tmp / "webhooks.log"),
            ]
            for worker in workers:
                started.append(worker.start())
            client = Client(settings)
            for worker in workers:
                print(f"waiting for the {worker.kind} worker to load and warm up ...")
                worker.wait_ready(redis_client, client.store.keys.worker(worker.name), timeout_s)
            began = time.monotonic()
            job = client.caption(image=sample_data_uri(), webhook=receiver.url("/demo"))
            print(f"submitted caption job {job.id}")
            record = client.wait(job.id, timeout_s)
            print(f"status: {record.status} in {time.monotonic() - began:.2f} s")
            if record.status != "succeeded":
                print(f"error: {record.error}")
                return 1
            assert record.output is not None
            print(f"caption: {record.output['captions'][0]['text']!r}")
            print(f"result:  {record.result_uri}")
            delivery = receiver.wait_for(lambda d: d.path == "/demo", timeout_s=30)[0]
            body = verify(delivery.headers, delivery.body, secret)
            print(
                f"webhook: {body['type']} received, signature verified "
                f"(webhook-id {delivery.headers['webhook-id']})"
            )
            client.close()
            return 0
        except (ImageqError, RuntimeError, TimeoutError) as exc:
            print(f"demo failed: {exc}")
            if not tiny:
                print("without network access to the model hub, try: imageq demo --tiny")
            return 1
        finally:
            for thing in reversed(started):
                thing.stop()
