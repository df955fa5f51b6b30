"""How often one job's life crosses between the runtime's modules, counted.

Runs one caption-kind job through ``JobRunner.execute`` (a real Redis, local storage, a
handler that reports two steps and stores one output, a webhook asking for every event)
with a profiler hook that follows every Python call and return made on the delivery's
thread. Each time execution moves from one ``workers/runtime`` module to another
(calls into, and returns back out of), that is one crossing; time spent outside the
runtime (api_client, redis-py, storage) does not count and does not break a run of one
module. Prints the crossings, the modules visited and how often each was entered.

    python bench/route.py
"""

from __future__ import annotations

import collections
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imageq.api_client.records import RecordStore, connect
from imageq.api_client.schemas import JobDocument
from imageq.api_client.settings import Settings
from imageq.workers.io.storage import LocalStorage
from imageq.workers.runtime.control import JobControl
from imageq.workers.runtime.lifecycle import JobRunner, WorkerContext
from imageq.workers.testing.services import RedisServer

RUNTIME = str(Path(__file__).resolve().parent.parent / "workers" / "runtime")


class Handler:
    ctx: WorkerContext

    def handle(self, job: JobDocument, inp: Any, control: JobControl) -> dict[str, Any]:
        for step in (1, 2):
            control(step, 2, {"stage": "captioning"})
        return {"file": self.ctx.put_output(job.id, "out.txt", b"x", "text/plain")}


def trace(runner: JobRunner, document: dict[str, Any]) -> list[str]:
    route: list[str] = []

    def hook(frame: Any, event: str, arg: Any) -> None:
        if event not in ("call", "return"):
            return
        code = frame.f_code.co_filename
        if not code.startswith(RUNTIME):
            return
        # On a return, execution goes back to the caller's module.
        if event == "return" and frame.f_back is not None:
            code = frame.f_back.f_code.co_filename
            if not code.startswith(RUNTIME):
                return
        module = Path(code).stem
        if not route or route[-1] != module:
            route.append(module)

    sys.setprofile(hook)
    try:
        runner.execute(document, "t")
    finally:
        sys.setprofile(None)
    return route


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis", appendonly=False).start()
        try:
            settings = Settings.from_env(
                {},
                broker_url=server.url,
                storage_url=f"file://{tmp}/storage",
                webhook_secret="whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            )
            store = RecordStore(connect(server.url), settings)
            handler = Handler()
            ctx = WorkerContext(
                settings=settings,
                store=store,
                storage=LocalStorage(Path(tmp) / "storage"),
                send_webhook=lambda event: None,
                worker_name="route",
                model_id="tiny",
            )
            handler.ctx = ctx
            runner = JobRunner(ctx, {"caption": handler})
            events = ["job.started", "job.progress", "job.succeeded"]
            document = {
                "id": str(uuid.uuid4()),
                "kind": "caption",
                "input": {"image": "https://example.com/x.png"},
                "webhook": {"url": "https://example.com/hook", "events": events},
            }
            route = trace(runner, document)
            runner.close()
        finally:
            server.stop()
    entered = collections.Counter(route)
    print(f"crossings between runtime modules: {len(route) - 1}")
    print("route: " + " > ".join(route))
    print("entered: " + ", ".join(f"{m} {n}" for m, n in entered.most_common()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
