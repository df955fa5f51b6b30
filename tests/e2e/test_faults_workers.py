"""Caption workers killed, poisoned, terminated and outlived by their own jobs.

One deployment for the module, on its own Redis database (kombu's unacked bookkeeping
is per database, and this module shortens the visibility timeout to 3 s). Each test
finds a live caption worker (or starts one) and leaves one alive for the next.

Pass criteria, per test: every job ends exactly once (one final record, one final
webhook per webhook-id, the images fetched once per run that reached them), and the
``attempt`` says how many runs started.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from imageq.api_client.schemas import JobRecord
from imageq.workers.testing.services import RedisServer, WebhookReceiver, WorkerProcess, wait_until
from tests.fixtures.services import Stack
from tests.helpers import png_bytes, png_uri

# Seconds to a minute each (worker restarts, outages): CI runs them too.
pytestmark = pytest.mark.slow

VISIBILITY_S = 3
MAX_ATTEMPTS = 2
# A batch of 16 images with long beam searches: seconds of model time on the tiny BLIP.
SLOW_GENERATION = {"max_new_tokens": 150, "min_new_tokens": 150, "num_beams": 10}
KILL_AFTER_S = 0.7


class Host:
    """Serves PNGs, slowly where told; ``/poison*`` SIGKILLs the live workers instead."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.slow_s: dict[str, float] = {}
        self.hits: dict[str, int] = {}
        # The test knows its workers' pids; only one caption worker lives when poisoned.
        self.targets: Callable[[], list[int]] = list
        self.kills = 0
        self._lock = threading.Lock()
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with host._lock:
                    host.hits[self.path] = host.hits.get(self.path, 0) + 1
                if self.path.startswith("/poison"):
                    # The fetching worker dies mid-request, as on a segfault or OOM kill.
                    for pid in host.targets():
                        os.kill(pid, signal.SIGKILL)
                        host.kills += 1
                    return
                body = host.files.get(self.path, png_bytes())
                self.send_response(200)
                self.send_header("content-type", "image/png")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                delay = host.slow_s.get(self.path, 0.0)
                if delay:
                    self.wfile.write(body[:10])
                    self.wfile.flush()
                    time.sleep(delay)
                self.wfile.write(body[10:] if delay else body)

            def log_message(self, *args: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def count(self, prefix: str) -> int:
        with self._lock:
            return sum(n for p, n in self.hits.items() if p.startswith(prefix))


@dataclass
class Fleet:
    stack: Stack
    host: Host
    receiver: WebhookReceiver
    started: list[WorkerProcess] = field(default_factory=list)

    def caption(self) -> WorkerProcess:
        """A live caption worker: the last one started if it lives, else a new one."""
        live = [w for w in self.started if w.alive()]
        if live:
            return live[-1]
        return self.start()

    def start(self, ready: bool = True) -> WorkerProcess:
        name = f"caption-{len(self.started)}@faults"
        worker = self.stack.worker("caption", name, ready=False)
        # Listed before it is ready: it may take a poisoned job as soon as it consumes.
        self.started.append(worker)
        if not ready:
            return worker
        return worker.wait_ready(self.stack.redis, self.stack.store.keys.worker(name))

    def live_pids(self) -> list[int]:
        return [w.pid for w in self.started if w.alive()]

    def deliveries(self, job_id: str) -> list[Any]:
        return self.receiver.for_job(job_id)

    def assert_one_final_webhook(self, job_id: str, event: str, settle_s: float = 1.5) -> None:
        self.receiver.wait_for(lambda d: d.json()["data"]["id"] == job_id)
        time.sleep(settle_s)  # a duplicate would arrive within the retry schedule
        found = [d for d in self.deliveries(job_id) if d.json()["type"] == event]
        assert len(found) == 1, [d.json()["type"] for d in self.deliveries(job_id)]
        assert len({d.headers["webhook-id"] for d in found}) == 1


@pytest.fixture(scope="module")
def fleet(
    make_stack: Callable[..., Stack],
    redis_server: RedisServer,
    tiny_caption_model: Path,
    receiver: WebhookReceiver,
) -> Iterator[Fleet]:
    host = Host()
    thread = threading.Thread(target=host.httpd.serve_forever, daemon=True)
    thread.start()
    stack = make_stack(
        IMAGEQ_BROKER_URL=redis_server.url.rsplit("/", 1)[0] + "/1",
        IMAGEQ_MODEL_CAPTION=str(tiny_caption_model),
        IMAGEQ_VISIBILITY_TIMEOUT_S=str(VISIBILITY_S),
        IMAGEQ_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
        IMAGEQ_MAX_BATCH_IMAGES="16",
        IMAGEQ_MAX_BATCH_WAIT_MS="500",
    )
    stack.worker("webhooks", "webhooks@faults")
    found = Fleet(stack, host, receiver)
    host.targets = found.live_pids
    yield found
    host.httpd.shutdown()
    host.httpd.server_close()


def _final(stack: Stack, job_id: str, timeout_s: float = 90) -> JobRecord:
    return stack.client.wait(job_id, timeout_s)


def _gone(worker: WorkerProcess) -> Callable[[], bool]:
    return lambda: not worker.alive()


def _outputs(stack: Stack, job_id: str) -> set[str]:
    return {p.name for p in stack.storage_path("jobs", job_id).iterdir()}


def test_sigkill_mid_batch_redelivers_every_job_once(
    fleet: Fleet, record_property: Callable[[str, object], None]
) -> None:
    stack, host = fleet.stack, fleet.host
    first = fleet.caption()
    jobs = []
    for j in range(4):
        images = [host.url(f"/batch/{j}/{i}.png") for i in range(4)]
        jobs.append(
            stack.client.caption(
                images=images,
                attention=True,
                generation=SLOW_GENERATION,
                webhook=fleet.receiver.url("/mid-batch"),
            ).id
        )
    # All 16 images fetched: the jobs have handed their items to the batcher, which
    # waits for company at most 0.5 s and then runs them as one forward pass.
    wait_until(lambda: host.count("/batch/") == 16, 60, "all images fetched")
    time.sleep(KILL_AFTER_S)
    records = [stack.client.get(j) for j in jobs]
    assert all(r.status == "running" and r.attempt == 1 for r in records), records
    first.kill()
    killed = time.monotonic()
    second = fleet.start()

    for job_id in jobs:
        record = _final(stack, job_id)
        assert record.status == "succeeded", record.error
        assert record.attempt == 2 and record.worker == second.name
        # Several jobs shared the redelivered forward pass, and it ran long enough that
        # the kill above landed inside the first one.
        assert record.metrics["batch_size"] > 4
        assert record.metrics["run_s"] > KILL_AFTER_S
        names = {f"attention-{i}.{ext}" for i in range(4) for ext in ("json", "png")}
        assert _outputs(stack, job_id) == names | {"result.json"}
    record_property("kill_to_all_succeeded_s", round(time.monotonic() - killed, 1))
    record_property("redelivered_batch_size", record.metrics["batch_size"])
    # Each image was fetched by the killed run and by the one that succeeded: no third.
    assert host.count("/batch/") == 32
    for job_id in jobs:
        fleet.assert_one_final_webhook(job_id, "job.succeeded", settle_s=0)
    time.sleep(1.5)
    for job_id in jobs:
        assert len(fleet.deliveries(job_id)) == 1
        assert fleet.deliveries(job_id)[0].json()["data"]["attempt"] == 2


def test_a_job_that_kills_every_worker_ends_worker_lost(
    fleet: Fleet, record_property: Callable[[str, object], None]
) -> None:
    stack, host = fleet.stack, fleet.host
    victim = fleet.caption()
    assert fleet.live_pids() == [victim.pid]
    job = stack.client.caption(image=host.url("/poison.png"), webhook=fleet.receiver.url("/poison"))
    for attempt in range(1, MAX_ATTEMPTS + 1):
        wait_until(_gone(victim), 60, f"the worker killed by run {attempt}")
        record = stack.client.get(job.id)
        assert record.status == "running" and record.attempt == attempt
        # The next worker takes the redelivered job as soon as it consumes, and only the
        # one after the last allowed attempt lives to become ready.
        victim = fleet.start(ready=attempt == MAX_ATTEMPTS)

    record = _final(stack, job.id)
    assert record.status == "failed"
    assert record.error is not None and record.error.code == "worker_lost", record.error
    record_property("workers_killed", host.kills)
    assert record.attempt == MAX_ATTEMPTS
    # Bounded: one fetch (and one dead worker) per allowed attempt, then never again.
    assert host.kills == MAX_ATTEMPTS and host.count("/poison") == MAX_ATTEMPTS
    assert victim.alive()
    fleet.assert_one_final_webhook(job.id, "job.failed")
    ok = stack.client.caption(image=png_uri())
    assert _final(stack, ok.id).status == "succeeded"
    assert host.count("/poison") == MAX_ATTEMPTS


def test_sigterm_during_jobs_finishes_them_once(
    fleet: Fleet, record_property: Callable[[str, object], None]
) -> None:
    stack, host = fleet.stack, fleet.host
    leaving = fleet.caption()
    jobs = []
    for j in range(3):
        host.slow_s[f"/deploy/{j}.png"] = 3.0
        jobs.append(
            stack.client.caption(
                image=host.url(f"/deploy/{j}.png"), webhook=fleet.receiver.url("/deploy")
            ).id
        )
    wait_until(lambda: host.count("/deploy/") == 3, 60, "jobs running")
    assert leaving.process is not None
    leaving.process.send_signal(signal.SIGTERM)  # a deploy: warm shutdown
    terminated = time.monotonic()
    arriving = fleet.start()
    assert leaving.process.wait(60) == 0
    record_property("sigterm_to_exit_s", round(time.monotonic() - terminated, 1))
    for job_id in jobs:
        record = _final(stack, job_id)
        assert record.status == "succeeded", record.error
        # Finished by the leaving worker, or handed back and run once by the new one.
        assert (record.worker, record.attempt) in {(leaving.name, 1), (arriving.name, 2)}
        record_property(f"job_{jobs.index(job_id)}_finished_by", record.worker or "")
        fleet.assert_one_final_webhook(job_id, "job.succeeded", settle_s=0)
    assert host.count("/deploy/") <= 6
    time.sleep(1.5)
    assert all(len(fleet.deliveries(j)) == 1 for j in jobs)
    assert arriving.alive()


def test_a_job_longer_than_the_visibility_timeout_never_runs_twice_at_once(
    fleet: Fleet, record_property: Callable[[str, object], None]
) -> None:
    stack, host = fleet.stack, fleet.host
    worker = fleet.caption()
    host.slow_s["/long.png"] = 3 * VISIBILITY_S
    job = stack.client.caption(
        image=host.url("/long.png"), attention=True, webhook=fleet.receiver.url("/long")
    )
    record = _final(stack, job.id)
    assert record.status == "succeeded", record.error
    assert record.attempt == 1
    assert host.hits["/long.png"] == 1
    assert _outputs(stack, job.id) == {"attention-0.json", "attention-0.png", "result.json"}
    fleet.assert_one_final_webhook(job.id, "job.succeeded")
    # Not vacuous: the broker really did hand the running message out again.
    log = worker.log_path.read_text()
    deliveries = log.count(f"imageq.caption[{job.id}] received")
    record_property("deliveries_of_the_message", deliveries)
    assert deliveries >= 2
