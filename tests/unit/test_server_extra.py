"""The install extras hold what their commands import.

``imageq[server]`` (no torch) must run ``imageq worker webhooks`` and ``imageq flower``;
the base install must run the client. Each check runs in a fresh interpreter where the
packages the install lacks cannot be imported (``sys.modules[name] = None`` makes
``import name`` raise ImportError), so a stray import anywhere on the path fails it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from imageq.workers.testing.services import free_port

ROOT = Path(__file__).resolve().parents[2]

# [worker] only: the model stack and what only models need.
MODEL_STACK = (
    "torch",
    "torchvision",
    "transformers",
    "diffusers",
    "peft",
    "accelerate",
    "safetensors",
    "PIL",
    "numpy",
)
# [server] only.
SERVER = ("boto3", "botocore", "requests", "urllib3", "prometheus_client", "flower", "tornado")


def run_blocked(
    script: str, blocked: tuple[str, ...], **env: str
) -> subprocess.CompletedProcess[str]:
    prelude = f"import sys\nfor _name in {blocked!r}:\n    sys.modules[_name] = None\n"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEQ_", "AWS_"))}
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_webhooks_worker_and_flower_run_without_the_model_stack() -> None:
    metrics_port = free_port()
    done = run_blocked(
        f"""
        import urllib.request

        from celery import signals

        import imageq.tasks.app  # what `celery -A tasks.app` (imageq worker webhooks, flower) loads

        # The worker's own start: build_runtime (storage, records, webhook dispatcher),
        # metrics and the registry, exactly as a Celery worker process fires it. A start
        # that fails exits the process with status 3.
        signals.worker_init.send(sender=None)
        with urllib.request.urlopen("http://127.0.0.1:{metrics_port}/metrics", timeout=30) as r:
            assert r.status == 200 and b"imageq_" in r.read()
        signals.worker_shutdown.send(sender=None)

        # imageq flower: its launcher, and Flower itself on the same app.
        import flower.app
        import flower.command
        from imageq.api_client.settings import Settings
        from imageq.workers.ops.flower import flower_env

        env = flower_env(Settings.from_env(), {{}}, finetune=False)
        assert env["FLOWER_BASIC_AUTH"] == "ops:pw"
        print("server path ok")
        """,
        MODEL_STACK,
        IMAGEQ_WORKER_KIND="webhooks",
        IMAGEQ_WORKER_NAME="webhooks@no-torch",
        # Nothing listens there: building the runtime must not need Redis yet.
        IMAGEQ_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0",
        IMAGEQ_STORAGE_URL="s3://imageq-bucket/prefix",
        IMAGEQ_METRICS_PORT=str(metrics_port),
        IMAGEQ_METRICS_ADDRESS="127.0.0.1",
        IMAGEQ_FLOWER_BASIC_AUTH="ops:pw",
        AWS_DEFAULT_REGION="us-east-1",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "server path ok" in done.stdout


def test_the_client_runs_on_the_base_install() -> None:
    done = run_blocked(
        """
        import pkgutil, importlib
        import imageq.api_client

        for module in pkgutil.walk_packages(imageq.api_client.__path__, "imageq.api_client."):
            importlib.import_module(module.name)
        from imageq.api_client.client import Client
        from imageq.api_client.settings import Settings

        Client(Settings.from_env()).close()
        print("client ok")
        """,
        MODEL_STACK + SERVER,
        IMAGEQ_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "client ok" in done.stdout
