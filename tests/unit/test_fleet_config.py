"""The fleet's config, its restart policy, and how it pins workers to GPUs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from imageq.api_client.settings import Settings
from imageq.workers.ops.fleet import Fleet, Member
from imageq.workers.ops.fleet_config import (
    FleetConfig,
    FleetConfigError,
    MemberConfig,
    RestartPolicy,
    load_config,
    parse_config,
)
from imageq.workers.ops.launch import WorkerSpec, exec_worker, worker_env

EXAMPLE_TOML = """
webhooks = 2
log_dir = "/var/log/imageq"

[[workers]]
kind = "caption"
device = "cuda:0"

[[workers]]
kind = "diffusion"
device = "cuda:1"
concurrency = 4
env = { IMAGEQ_MAX_DIFFUSION_BATCH_IMAGES = "4" }

[[workers]]
kind = "match"
device = "cpu"
queues = ["match", "match-bulk"]

[restart]
max_quick_failures = 3
backoff_initial_s = 2
"""


def test_toml_config_names_workers_by_kind_and_gpu(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(EXAMPLE_TOML)
    config = load_config(path)
    assert [(m.kind, m.device, m.name) for m in config.members[:3]] == [
        ("caption", "cuda:0", "caption@gpu0"),
        ("diffusion", "cuda:1", "diffusion@gpu1"),
        ("match", "cpu", "match@cpu"),
    ]
    hooks = config.members[3:]
    assert [m.kind for m in hooks] == ["webhooks", "webhooks"]
    assert hooks[0].name.startswith("webhooks-1@") and hooks[1].name.startswith("webhooks-2@")
    assert config.members[1].env == {"IMAGEQ_MAX_DIFFUSION_BATCH_IMAGES": "4"}
    assert config.restart == RestartPolicy(max_quick_failures=3, backoff_initial_s=2.0)
    assert config.log_dir == "/var/log/imageq"
    argv = config.members[2].argv("INFO")
    assert argv[1:] == [
        "-m",
        "imageq.workers",
        "worker",
        "match",
        "--device",
        "cpu",
        "--name",
        "match@cpu",
        "--loglevel",
        "INFO",
        "--queues",
        "match,match-bulk",
    ]
    assert config.members[1].argv("INFO")[-2:] == ["--concurrency", "4"]


def test_json_config_and_a_file_without_suffix(tmp_path: Path) -> None:
    data = {"workers": [{"kind": "caption", "device": "cuda"}], "webhooks": 0}
    for name in ("fleet.json", "fleet"):
        path = tmp_path / name
        path.write_text(json.dumps(data))
        config = load_config(path)
        assert config.members == (MemberConfig("caption", "cuda:0", "caption@gpu0"),)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"workers": [], "gpus": 2}, "config: unknown key(s) gpus"),
        ({"workers": [{"kind": "caption", "device": "cpu", "devic": "x"}]}, "workers[0]: unknown"),
        ({"workers": [{"kind": "painter", "device": "cpu"}]}, "workers[0].kind"),
        ({"workers": [{"kind": "webhooks", "device": "cpu"}]}, "top-level webhooks"),
        ({"workers": [{"kind": "caption"}]}, "workers[0].device"),
        ({"workers": [{"kind": "caption", "device": "auto"}]}, "workers[0].device"),
        ({"workers": [{"kind": "caption", "device": "cuda:x"}]}, "workers[0].device"),
        ({"workers": [{"kind": "caption", "device": "cuda:0,1"}]}, "workers[0].device"),
        (
            {"workers": [{"kind": "caption", "device": "cuda:0"}] * 2},
            "workers[1].name: 'caption@gpu0' is taken",
        ),
        ({"workers": [{"kind": "caption", "device": "cpu", "name": "c"}]}, "workers[0].name"),
        ({"workers": [{"kind": "caption", "device": "cpu", "env": {"A": 1}}]}, "workers[0].env"),
        ({"workers": [{"kind": "caption", "device": "cpu", "concurrency": -1}]}, "concurrency"),
        ({"workers": [{"kind": "caption", "device": "cpu", "queues": [""]}]}, "queues"),
        ({"webhooks": -1}, "webhooks: expected"),
        ({"webhooks": True}, "webhooks: expected"),
        ({"webhooks": 0}, "nothing to run"),
        ({"workers": "caption"}, "workers: expected a list"),
        ({"restart": {"max_quick_failures": 0}}, "restart.max_quick_failures"),
        ({"restart": {"backoff_max_s": "1m"}}, "restart.backoff_max_s"),
        ({"restart": {"retries": 3}}, "restart: unknown key(s) retries"),
        ({"loglevel": 10}, "loglevel: expected a string"),
        ([1, 2], "config: expected a table"),
    ],
)
def test_bad_configs_name_the_field(data: Any, field: str) -> None:
    with pytest.raises(FleetConfigError) as info:
        parse_config(data)
    assert field in str(info.value)


def test_unreadable_and_malformed_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(FleetConfigError, match="No such file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[workers]\nkind=")
    with pytest.raises(FleetConfigError, match="not valid TOML or JSON"):
        load_config(bad)


def test_backoff_doubles_up_to_its_cap() -> None:
    policy = RestartPolicy(backoff_initial_s=1.0, backoff_max_s=5.0)
    assert [policy.backoff_s(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


class FakeProcess:
    """Stands in for a worker's Popen: exits with ``code`` when told to."""

    pid = 4242

    def __init__(self) -> None:
        self.code: int | None = None

    def poll(self) -> int | None:
        return self.code


def _fleet(**restart: float) -> tuple[Fleet, Member, list[FakeProcess]]:
    config = FleetConfig(
        members=(MemberConfig("caption", "cpu", "caption@cpu"),),
        restart=RestartPolicy(**restart),
    )
    fleet = Fleet(config, {})
    started: list[FakeProcess] = []

    def start(member: Member, now: float) -> None:
        process = FakeProcess()
        started.append(process)
        member.process = process
        member.started_at = now

    fleet._start = start
    return fleet, fleet.members[0], started


def test_quick_failures_back_off_then_give_up() -> None:
    fleet, member, started = _fleet(
        backoff_initial_s=1.0, quick_failure_s=30.0, max_quick_failures=3
    )
    fleet._tend(member, 0.0)
    assert len(started) == 1
    started[-1].code = 3
    fleet._tend(member, 5.0)
    assert member.process is None and member.next_start_at == 6.0
    fleet._tend(member, 5.5)  # still backing off
    assert len(started) == 1
    fleet._tend(member, 6.0)
    started[-1].code = 3
    fleet._tend(member, 7.0)
    assert member.next_start_at == 9.0  # doubled
    fleet._tend(member, 9.0)
    started[-1].code = 3
    fleet._tend(member, 10.0)
    assert member.given_up and len(started) == 3
    fleet._tend(member, 100.0)
    assert len(started) == 3


def test_a_worker_that_ran_a_while_restarts_promptly_and_its_count_resets() -> None:
    fleet, member, started = _fleet(
        backoff_initial_s=1.0, quick_failure_s=30.0, max_quick_failures=2
    )
    fleet._tend(member, 0.0)
    started[-1].code = 3
    fleet._tend(member, 1.0)  # one quick failure
    fleet._tend(member, 2.0)
    started[-1].code = -9
    fleet._tend(member, 500.0)  # ran for 498 s: not a quick failure
    assert not member.given_up and member.quick_failures == 0
    assert member.next_start_at == 501.0


def test_the_fleet_process_never_imports_torch(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(EXAMPLE_TOML)
    code = (
        "import sys\n"
        "from workers.ops.fleet import main\n"
        f"assert main(['--dry-run', {str(path)!r}]) == 0\n"
        "assert 'torch' not in sys.modules, 'the fleet imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "caption@gpu0:" in result.stdout
    assert "IMAGEQ_MAX_DIFFUSION_BATCH_IMAGES=4" in result.stdout


def test_a_gpu_worker_sees_only_its_gpu_and_keeps_its_name() -> None:
    spec = WorkerSpec(kind="caption", device="cuda:1")
    env = worker_env(spec, {"PATH": "/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["IMAGEQ_DEVICE"] == "cuda:0"
    assert env["IMAGEQ_WORKER_NAME"] == "caption@gpu1"
    # cuda:N counts the GPUs this process may use, as torch would number them.
    inherited = worker_env(spec, {"CUDA_VISIBLE_DEVICES": "GPU-aaa, GPU-bbb"})
    assert inherited["CUDA_VISIBLE_DEVICES"] == "GPU-bbb"
    assert worker_env(WorkerSpec(kind="caption", device="cuda"), {})["IMAGEQ_WORKER_NAME"] == (
        "caption@gpu0"
    )
    cpu = worker_env(WorkerSpec(kind="caption", device="cpu"), {"CUDA_VISIBLE_DEVICES": "3"})
    assert cpu["CUDA_VISIBLE_DEVICES"] == "3" and cpu["IMAGEQ_DEVICE"] == "cpu"


@pytest.mark.parametrize(
    ("device", "visible"), [("cuda:2", "0,1"), ("cuda:0", ""), ("cuda:x", None)]
)
def test_a_gpu_that_is_not_there_stops_the_launch(device: str, visible: str | None) -> None:
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    with pytest.raises(SystemExit, match=r"imageq: device '?cuda:"):
        exec_worker(WorkerSpec(kind="caption", device=device), Settings(), env)


def test_several_processes_feed_one_device() -> None:
    config = parse_config(
        {"webhooks": 0, "workers": [{"kind": "caption", "device": "cuda:1", "processes": 3}]}
    )
    assert [(m.name, m.device) for m in config.members] == [
        ("caption@gpu1", "cuda:1"),
        ("caption-2@gpu1", "cuda:1"),
        ("caption-3@gpu1", "cuda:1"),
    ]
    for bad in (0, 17, True, "2"):
        with pytest.raises(FleetConfigError, match="processes"):
            parse_config({"workers": [{"kind": "caption", "device": "cpu", "processes": bad}]})
