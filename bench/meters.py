"""What the dispatch benchmark reads: a process tree's CPU, Redis's command counts, and an
S3 server that counts the requests it serves.

All three are read from outside the process under test, so measuring costs it nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from imageq.workers.testing.services import free_port

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after its last ")".
    return raw[raw.rindex(")") + 2 :].split()


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def tree_cpu_split(pid: int) -> tuple[float, float]:
    """CPU seconds of ``pid``, the processes it started that still run, and those it
    started and reaped (cutime/cstime), as (user, system): threads that ended are
    already in their process's own counts."""
    tree = _children()
    user, system, todo = 0.0, 0.0, [pid]
    while todo:
        current = todo.pop()
        fields = _stat(current)
        if fields is None:
            continue
        # Fields 14-17 of /proc/PID/stat (here 11-14): utime stime cutime cstime, in ticks.
        user += (int(fields[11]) + int(fields[13])) * _TICK_S
        system += (int(fields[12]) + int(fields[14])) * _TICK_S
        todo.extend(tree.get(current, ()))
    return user, system


def command_stats(client: redis.Redis) -> dict[str, int]:
    """Calls per Redis command since the server started (``INFO commandstats``)."""
    info: Any = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in info.items()
        if isinstance(value, dict)
    }


def stats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {k: v for k, v in sorted(delta.items(), key=lambda kv: -kv[1]) if v > 0}


class Monitor:
    """Counts the commands clients send Redis (``MONITOR``), apart from those that
    scripts run: ``INFO commandstats`` counts both, and a script is one round trip."""

    def __init__(self, url: str) -> None:
        import threading

        self.url = url
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.sent: dict[str, int] = {}
        self.scripted: dict[str, int] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.3)  # the last commands are still on their way to us
        self._stop.set()
        # A command of our own wakes the reader, which then sees the stop.
        with redis.Redis.from_url(self.url) as poke:
            poke.echo("imageq-bench-monitor-stop")
        self._thread.join(5)

    def _run(self) -> None:
        with self.client.monitor() as monitor:
            self._ready.set()
            while True:
                try:
                    command = monitor.next_command()
                except Exception:  # the connection went away: count what we have
                    return
                if self._stop.is_set():
                    return
                name = str(command.get("command", "")).split(" ", 1)[0].lower()
                into = self.scripted if command.get("client_type") == "lua" else self.sent
                into[name] = into.get(name, 0) + 1


# moto logs one werkzeug line per request: ... "PUT /bucket/key HTTP/1.1" 200 -
_REQUEST = re.compile(rb'"(GET|PUT|POST|HEAD|DELETE) /')


@dataclass
class S3Server:
    """moto's S3 server on a free loopback port; it logs every request it serves."""

    log: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    bucket: str = "imageq-bench"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def available() -> bool:
        return (Path(sys.executable).parent / "moto_server").exists()

    def start(self) -> S3Server:
        import boto3

        self.port = free_port()
        binary = Path(sys.executable).parent / "moto_server"
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                [str(binary), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.05)
        boto3.client("s3", endpoint_url=self.url, **self.credentials()).create_bucket(
            Bucket=self.bucket
        )
        return self

    @staticmethod
    def credentials() -> dict[str, str]:
        return {
            "aws_access_key_id": "bench",
            "aws_secret_access_key": "bench",
            "region_name": "us-east-1",
        }

    def env(self) -> dict[str, str]:
        return {
            "IMAGEQ_STORAGE_URL": f"s3://{self.bucket}/imageq",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.url,
        }

    def requests(self) -> int:
        """Requests served so far (its log is flushed per line)."""
        return len(_REQUEST.findall(self.log.read_bytes()))

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


def py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("--profile needs py-spy: pip install -e '.[dev]' (or pip install py-spy)")
    argv = [spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw"]
    argv += ["--subprocesses", "--gil", "--nonblocking", "--output", str(out)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the phase starts
    return process


def summarise_profile(path: Path, top: int = 30) -> None:
    """Inclusive share of samples per function (py-spy raw format: stack count)."""
    totals: dict[str, int] = {}
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        samples += n
        for frame in set(stack.split(";")[1:]):
            name = frame.split(" (", 1)[0] + " " + frame.rsplit("/", 1)[-1].split(":")[0]
            totals[name] = totals.get(name, 0) + n
    print(f"\nprofile ({samples} samples, busy threads): inclusive share per function")
    for name, n in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {100 * n / max(1, samples):5.1f}%  {name}")
