"""The ``imageq fleet`` config: which worker kind runs on which device.

TOML or JSON, validated up front so a typo fails at once with the field's name (see
``imageq.workers.ops.fleet`` for the format). Nothing here starts a process or imports torch.
"""

from __future__ import annotations

import json
import socket
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from imageq.api_client.names import WORKER_KINDS
from imageq.workers.ops.devices import cuda_index, is_cuda, node_suffix


class FleetConfigError(ValueError):
    """The fleet config is unusable; the message names the offending field."""


@dataclass(frozen=True)
class RestartPolicy:
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    quick_failure_s: float = 30.0
    max_quick_failures: int = 5
    stop_timeout_s: float = 60.0

    def backoff_s(self, failures: int) -> float:
        """Delay before the next start after ``failures`` quick failures in a row."""
        return min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(0, failures - 1))


@dataclass(frozen=True)
class MemberConfig:
    """One worker process of the fleet."""

    kind: str
    device: str
    name: str
    queues: tuple[str, ...] = ()
    concurrency: int = 0
    env: Mapping[str, str] = field(default_factory=dict)

    def argv(self, loglevel: str) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "imageq.workers",
            "worker",
            self.kind,
            "--device",
            self.device,
        ]
        argv += ["--name", self.name, "--loglevel", loglevel]
        if self.queues:
            argv += ["--queues", ",".join(self.queues)]
        if self.concurrency:
            argv += ["--concurrency", str(self.concurrency)]
        return argv


@dataclass(frozen=True)
class FleetConfig:
    members: tuple[MemberConfig, ...]
    restart: RestartPolicy = RestartPolicy()
    log_dir: str = ""
    loglevel: str = "INFO"


_TOP_KEYS = {"workers", "webhooks", "restart", "log_dir", "loglevel"}
_WORKER_KEYS = {"kind", "device", "name", "queues", "concurrency", "env", "processes"}
#: The most worker processes one [[workers]] entry may start on its device.
MAX_PROCESSES = 16


def load_config(path: Path) -> FleetConfig:
    """Read a ``.toml`` or ``.json`` fleet config (by suffix; otherwise JSON, then TOML)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise FleetConfigError(f"{path}: {exc.strerror or exc}") from None
    try:
        if path.suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise FleetConfigError(f"{path}: not valid TOML or JSON: {exc}") from None
    return parse_config(data, hostname=socket.gethostname())


def parse_config(data: Any, hostname: str = "localhost") -> FleetConfig:
    """Validate a decoded config; every error names the field it is about."""
    if not isinstance(data, dict):
        raise FleetConfigError("config: expected a table (TOML) or an object (JSON)")
    _no_unknown(data, _TOP_KEYS, "config")
    raw_workers = data.get("workers", [])
    if not isinstance(raw_workers, list):
        raise FleetConfigError("workers: expected a list of tables ([[workers]])")
    members = [m for i, raw in enumerate(raw_workers) for m in _members(raw, f"workers[{i}]")]
    webhooks = data.get("webhooks", 1)
    if isinstance(webhooks, bool) or not isinstance(webhooks, int) or not 0 <= webhooks <= 64:
        raise FleetConfigError("webhooks: expected a number of webhook workers, 0 to 64")
    members += [
        MemberConfig(kind="webhooks", device="cpu", name=f"webhooks-{i + 1}@{hostname}")
        for i in range(webhooks)
    ]
    if not members:
        raise FleetConfigError("config: no workers and no webhook workers: nothing to run")
    seen: dict[str, int] = {}
    for i, member in enumerate(members):
        if member.name in seen:
            raise FleetConfigError(
                f"workers[{i}].name: {member.name!r} is taken by another worker; "
                "give one of them a name"
            )
        seen[member.name] = i
    for key in ("log_dir", "loglevel"):
        if key in data and not isinstance(data[key], str):
            raise FleetConfigError(f"{key}: expected a string")
    return FleetConfig(
        members=tuple(members),
        restart=_restart(data.get("restart", {})),
        log_dir=data.get("log_dir", ""),
        loglevel=data.get("loglevel", "INFO"),
    )


def _no_unknown(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise FleetConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
        )


def _members(raw: Any, where: str) -> list[MemberConfig]:
    """An entry's worker processes: ``processes = N`` starts N on its one device.

    Several processes per GPU: one process's Python (Celery, records, fetching and
    decoding) tops out at a few hundred single-image jobs a second, well below what a
    GPU captions; each process holds its own copy of the model (docs/performance.md).
    The first keeps the entry's name, the others are ``KIND-2@...``, ``KIND-3@...``.
    """
    member = _member(raw, where)
    processes = raw.get("processes", 1)
    if (
        isinstance(processes, bool)
        or not isinstance(processes, int)
        or not 1 <= processes <= MAX_PROCESSES
    ):
        raise FleetConfigError(f"{where}.processes: expected 1 to {MAX_PROCESSES}")
    base, _, host = member.name.partition("@")
    return [member] + [replace(member, name=f"{base}-{i}@{host}") for i in range(2, processes + 1)]


def _member(raw: Any, where: str) -> MemberConfig:
    if not isinstance(raw, dict):
        raise FleetConfigError(f"{where}: expected a table with kind and device")
    _no_unknown(raw, _WORKER_KEYS, where)
    kind = raw.get("kind")
    gpu_kinds = [k for k in WORKER_KINDS if k != "webhooks"]
    if kind == "webhooks":
        raise FleetConfigError(f"{where}.kind: set the top-level webhooks = N instead")
    if kind not in gpu_kinds:
        raise FleetConfigError(f"{where}.kind: expected one of {', '.join(gpu_kinds)}")
    device = raw.get("device")
    if not isinstance(device, str) or not _valid_device(device):
        raise FleetConfigError(f"{where}.device: expected cpu or cuda:N (one device per worker)")
    if device == "cuda":
        device = "cuda:0"
    name = raw.get("name", f"{kind}@{node_suffix(device)}")
    if not isinstance(name, str) or "@" not in name or any(c.isspace() for c in name):
        raise FleetConfigError(f"{where}.name: expected a node name like caption@gpu0")
    queues = raw.get("queues", [])
    if isinstance(queues, str):
        queues = [q for q in queues.split(",") if q]
    if not isinstance(queues, list) or not all(isinstance(q, str) and q for q in queues):
        raise FleetConfigError(f"{where}.queues: expected a list of queue names")
    concurrency = raw.get("concurrency", 0)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 0:
        raise FleetConfigError(f"{where}.concurrency: expected a positive number")
    env = raw.get("env", {})
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise FleetConfigError(f'{where}.env: expected string values, e.g. {{ NAME = "value" }}')
    return MemberConfig(kind, device, name, tuple(queues), concurrency, dict(env))


def _valid_device(device: str) -> bool:
    if device == "cpu":
        return True
    if not is_cuda(device):
        return False
    try:
        cuda_index(device)
    except ValueError:
        return False
    return True


def _restart(raw: Any) -> RestartPolicy:
    if not isinstance(raw, dict):
        raise FleetConfigError("restart: expected a table")
    names = {f.name for f in fields(RestartPolicy)}
    _no_unknown(raw, names, "restart")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        integral = key == "max_quick_failures"
        ok = isinstance(value, int) if integral else isinstance(value, int | float)
        if isinstance(value, bool) or not ok or value < (1 if integral else 0):
            kind = "a whole number >= 1" if integral else "a number of seconds >= 0"
            raise FleetConfigError(f"restart.{key}: expected {kind}")
        values[key] = value if integral else float(value)
    return RestartPolicy(**values)
