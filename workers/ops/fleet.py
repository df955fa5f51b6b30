"""``imageq fleet CONFIG``: one worker process per configured device, kept alive.

The config (TOML or JSON) says which worker kind runs on which device and how many
webhook workers run beside them::

    webhooks = 2                 # webhook delivery workers (no GPU)

    [[workers]]
    kind = "caption"
    device = "cuda:0"            # named caption@gpu0; sees only GPU 0

    [[workers]]
    kind = "diffusion"
    device = "cuda:1"
    env = { IMAGEQ_MAX_DIFFUSION_BATCH_IMAGES = "4" }

    [[workers]]
    kind = "match"
    device = "cuda:2"
    processes = 4                # four processes feed GPU 2: match@gpu2, match-2@gpu2, ...

    [restart]                    # optional; these are the defaults
    backoff_initial_s = 1.0
    backoff_max_s = 60.0
    quick_failure_s = 30.0       # an exit sooner than this after start is a quick failure
    max_quick_failures = 5       # give up on a worker after this many in a row
    stop_timeout_s = 60.0        # SIGTERM, wait this long, then SIGKILL

Each worker is ``python -m workers worker KIND --device D --name NAME`` in its own
process (the launcher pins ``cuda:N`` with ``CUDA_VISIBLE_DEVICES``). A worker that
exits is restarted with exponential backoff; one that keeps failing right after start
(a model that cannot load exits with code 3) is given up and reported, not restarted in
a hot loop. SIGTERM or Ctrl-C forwards SIGTERM to every worker (a warm shutdown: jobs
finish or go back to the queue), waits, then SIGKILLs stragglers.

This process never imports torch: CUDA is initialised only in the workers it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

from imageq.api_client.settings import process_environment
from imageq.workers.ops.devices import pin_cuda
from imageq.workers.ops.fleet_config import FleetConfig, FleetConfigError, MemberConfig, load_config

log = logging.getLogger("imageq.fleet")

# The exit code of a worker that cannot load its model (tasks.signals).
EXIT_CANNOT_LOAD = 3


# -- supervision ------------------------------------------------------------------------


@dataclass
class Member:
    """One configured worker and the process currently running it, if any."""

    config: MemberConfig
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    next_start_at: float = 0.0
    quick_failures: int = 0
    starts: int = 0
    given_up: bool = False


class Fleet:
    def __init__(self, config: FleetConfig, base_env: Mapping[str, str]) -> None:
        self.config = config
        self.base_env = dict(base_env)
        self.members = [Member(m) for m in config.members]
        self._stopping = False
        self._signals = 0
        # One log file per worker, kept open across its restarts.
        self._logs: dict[str, IO[bytes]] = {}

    # -- signals ----------------------------------------------------------------------
    def request_stop(self, signum: int, frame: FrameType | None = None) -> None:
        self._signals += 1
        self._stopping = True
        if self._signals > 1:
            # A second Ctrl-C: the operator does not want to wait for running jobs.
            log.warning("second signal: killing every worker now")
            self._signal_all(signal.SIGKILL)

    # -- the loop ---------------------------------------------------------------------
    def run(self, poll_s: float = 0.2) -> int:
        try:
            while not self._stopping:
                now = time.monotonic()
                for member in self.members:
                    self._tend(member, now)
                if all(m.given_up for m in self.members):
                    log.error("every worker was given up; the fleet stops")
                    break
                time.sleep(poll_s)
        finally:
            self.stop()
            for handle in self._logs.values():
                handle.close()
        given_up = [m.config.name for m in self.members if m.given_up]
        if given_up:
            log.error("given up: %s", ", ".join(given_up))
            return 1
        return 0

    def _tend(self, member: Member, now: float) -> None:
        if member.given_up:
            return
        process = member.process
        if process is None:
            if now >= member.next_start_at:
                self._start(member, now)
            return
        code = process.poll()
        if code is None:
            return
        member.process = None
        ran_s = now - member.started_at
        quick = ran_s < self.config.restart.quick_failure_s
        member.quick_failures = member.quick_failures + 1 if quick else 0
        reason = _describe_exit(code)
        if member.quick_failures >= self.config.restart.max_quick_failures:
            member.given_up = True
            log.error(
                "giving up on %s: it failed %d times in a row within %.0f s of starting "
                "(last: %s); fix it and restart the fleet",
                member.config.name,
                member.quick_failures,
                self.config.restart.quick_failure_s,
                reason,
            )
            return
        delay = self.config.restart.backoff_s(max(1, member.quick_failures))
        member.next_start_at = now + delay
        log.warning(
            "%s %s after %.1f s; restarting in %.1f s",
            member.config.name,
            reason,
            ran_s,
            delay,
        )

    def _start(self, member: Member, now: float) -> None:
        config = member.config
        env = {**self.base_env, **config.env}
        try:
            # Checked here so a bad pin is reported once, not as a crash loop.
            pin_cuda(config.device, env)
        except ValueError as exc:
            member.given_up = True
            log.error("giving up on %s: %s", config.name, exc)
            return
        stdout: IO[bytes] | None = None
        if self.config.log_dir:
            stdout = self._logs.get(config.name)
            if stdout is None:
                directory = Path(self.config.log_dir)
                directory.mkdir(parents=True, exist_ok=True)
                stdout = self._logs[config.name] = (directory / f"{config.name}.log").open("ab")
        member.process = subprocess.Popen(
            config.argv(self.config.loglevel),
            env=env,
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
            # Own process group: a terminal's Ctrl-C reaches only the fleet, which then
            # sends each worker one SIGTERM (a second signal can make Celery cold-stop).
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        member.started_at = now
        member.starts += 1
        log.info("started %s (pid %d) on %s", config.name, member.process.pid, config.device)

    # -- stopping ---------------------------------------------------------------------
    def _signal_all(self, signum: int) -> None:
        for member in self.members:
            if member.process is not None and member.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    member.process.send_signal(signum)

    def stop(self) -> None:
        """SIGTERM every worker, wait up to ``stop_timeout_s``, then SIGKILL the rest."""
        running = [m for m in self.members if m.process is not None]
        if not running:
            return
        log.info("stopping %d worker(s)", len(running))
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.config.restart.stop_timeout_s
        for member in running:
            assert member.process is not None
            try:
                member.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time: SIGKILL", member.config.name)
                member.process.kill()
                member.process.wait()
            member.process = None


def _describe_exit(code: int) -> str:
    if code == EXIT_CANNOT_LOAD:
        return "exited with code 3 (cannot load its model; see its log)"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the fleet itself dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    except (OSError, AttributeError):
        return


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imageq fleet",
        description="Start one worker per configured device; restart the ones that die.",
    )
    parser.add_argument("config", type=Path, help="fleet config, .toml or .json")
    parser.add_argument(
        "--dry-run", action="store_true", help="check the config and print the workers' commands"
    )
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fleet: %(message)s")
    try:
        config = load_config(args.config)
    except FleetConfigError as exc:
        print(f"imageq fleet: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for member in config.members:
            env = " ".join(f"{k}={v}" for k, v in sorted(member.env.items()))
            print(
                f"{member.name}: {env + ' ' if env else ''}{' '.join(member.argv(config.loglevel))}"
            )
        return 0
    fleet = Fleet(config, process_environment())
    signal.signal(signal.SIGTERM, fleet.request_stop)
    signal.signal(signal.SIGINT, fleet.request_stop)
    return fleet.run()
