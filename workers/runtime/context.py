"""What a worker kind's handlers get and give: the worker's context, the handler
protocol, and the few types the runtime and the kinds share (``lifecycle`` runs jobs
with them; ``build`` makes them).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from imageq.api_client.records import RecordStore
from imageq.api_client.schemas import JobDocument
from imageq.api_client.settings import Settings
from imageq.workers.io.storage import Storage
from imageq.workers.runtime.control import JobControl, LeaseKeeper
from imageq.workers.runtime.failover import SendJob
from imageq.workers.webhooks.post import WebhookEvent

#: A job's ``output`` document (kind-specific JSON) and one stored file's reference.
Output = dict[str, Any]


class Deferred(Exception):
    """Another live worker holds this job: look again after ``countdown_s``."""

    def __init__(self, countdown_s: float) -> None:
        super().__init__(f"job held by another worker; retry in {countdown_s} s")
        self.countdown_s = countdown_s


class Handler(Protocol):
    """Runs one kind of job; returns the ``output`` document.

    ``inp`` is ``job.input``, the kind's own model (``CaptionInput``...), validated once
    on receipt; handlers declare the model they serve.
    """

    def handle(self, job: JobDocument, inp: Any, control: JobControl) -> Output: ...


# What a worker kind's ``build(ctx, device)`` returns: its handlers and what to stop.
Built = tuple[dict[str, Handler], list[Callable[[], None]]]


@dataclass
class WorkerContext:
    settings: Settings
    store: RecordStore
    storage: Storage
    send_webhook: Callable[[WebhookEvent], None]
    worker_name: str
    model_id: str = ""
    #: Re-sends a job document to its queue (hand-back, failover); None: nowhere to send.
    send_job: SendJob | None = None
    #: Set once the worker shuts down (SIGTERM): jobs that can resume elsewhere stop.
    draining: threading.Event = field(default_factory=threading.Event)
    #: The leases of the jobs running here, by job id.
    leases: dict[str, LeaseKeeper] = field(default_factory=dict)

    def put_output(self, job_id: str, name: str, data: bytes, content_type: str) -> Output:
        """Store one output file beside result.json; S3 outputs carry a presigned URL.

        Only while this worker holds the job's lease: a run that lost it (it stalled,
        another worker runs the job now) must not overwrite the other run's outputs.
        """
        lease = self.leases.get(job_id)
        if lease is not None:
            lease.verify()
        key = f"jobs/{job_id}/{name}"
        ref: Output = {"uri": self.storage.put(key, data, content_type)}
        url = self.storage.public_url(key)
        if url:
            ref["url"] = url
        return ref
