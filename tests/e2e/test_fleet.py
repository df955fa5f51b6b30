"""``imageq fleet`` with real processes: start, restart a killed worker, stop them all."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imageq.workers.testing.services import wait_until
from tests.fixtures.services import Stack
from tests.helpers import png_uri


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead but still listed until its parent reaps it.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


class FleetProcess:
    def __init__(self, stack: Stack, config: dict[str, Any], name: str) -> None:
        self.stack = stack
        path = stack.tmp / f"{name}.json"
        path.write_text(json.dumps(config))
        self.log_path = stack.tmp / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imageq.api_client.cli", "fleet", str(path)],
            env=stack.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def registered_pid(self, name: str) -> int | None:
        raw = self.stack.redis.get(self.stack.store.keys.worker(name))
        return None if raw is None else int(json.loads(raw)["pid"])

    def wait_registered(self, name: str, other_than: int | None = None) -> int:
        found: list[int] = []

        def check() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"fleet exited early:\n{self.log()}")
            pid = self.registered_pid(name)
            if pid is not None and pid != other_than:
                found.append(pid)
                return True
            return False

        wait_until(check, 90, f"{name} registered", every_s=0.2)
        return found[-1]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


@pytest.fixture()
def fleets() -> Iterator[list[FleetProcess]]:
    started: list[FleetProcess] = []
    yield started
    for fleet in started:
        fleet.close()


def test_fleet_starts_restarts_and_stops_every_worker(
    make_stack: Callable[..., Stack], tiny_caption_model: Path, fleets: list[FleetProcess]
) -> None:
    stack = make_stack(IMAGEQ_MODEL_CAPTION=str(tiny_caption_model))
    caption, webhooks = "caption@fleet-e2e", f"webhooks-1@{socket.gethostname()}"
    config = {
        "workers": [{"kind": "caption", "device": "cpu", "name": caption}],
        "webhooks": 1,
        "log_dir": str(stack.tmp / "fleet-logs"),
        "restart": {"backoff_initial_s": 0.2, "quick_failure_s": 2, "stop_timeout_s": 30},
    }
    fleet = FleetProcess(stack, config, "fleet")
    fleets.append(fleet)
    first = fleet.wait_registered(caption)
    hooks = fleet.wait_registered(webhooks)
    # The fleet's worker serves jobs under its configured name.
    record = stack.client.wait(stack.client.caption(image=png_uri()).id, 60)
    assert record.status == "succeeded" and record.worker == caption

    os.kill(first, signal.SIGKILL)
    second = fleet.wait_registered(caption, other_than=first)
    assert second != first and not _alive(first)
    assert _alive(hooks), "killing one worker must leave the others alone"
    record = stack.client.wait(stack.client.caption(image=png_uri((9, 9, 9))).id, 60)
    assert record.status == "succeeded" and record.worker == caption
    assert f"{caption} was killed by SIGKILL" in fleet.log()

    fleet.process.send_signal(signal.SIGTERM)
    assert fleet.process.wait(60) == 0, fleet.log()
    for pid in (first, second, hooks):
        assert not _alive(pid), f"worker {pid} outlived the fleet"
    # Warm shutdown: each worker took itself out of the registry on the way out.
    assert fleet.registered_pid(caption) is None and fleet.registered_pid(webhooks) is None


def test_fleet_gives_up_on_a_worker_that_cannot_load_its_model(
    make_stack: Callable[..., Stack], fleets: list[FleetProcess], tmp_path: Path
) -> None:
    stack = make_stack(IMAGEQ_MODEL_CAPTION=str(tmp_path / "no-such-model"))
    config = {
        "workers": [{"kind": "caption", "device": "cpu", "name": "caption@broken"}],
        "webhooks": 0,
        "restart": {"backoff_initial_s": 0.1, "quick_failure_s": 60, "max_quick_failures": 2},
    }
    fleet = FleetProcess(stack, config, "broken-fleet")
    fleets.append(fleet)
    # The only worker was given up: nothing left to supervise, so the fleet exits 1.
    assert fleet.process.wait(90) == 1
    text = fleet.log()
    assert text.count("started caption@broken") == 2
    assert "exited with code 3 (cannot load its model" in text
    assert "giving up on caption@broken" in text
