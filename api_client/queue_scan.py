"""Finding a job that sits in its queue before any worker or record knows it.

A backend that enqueues with its own Celery client (by task name) creates no record; so
that ``get`` and ``cancel`` still know the job from the moment it is enqueued, a miss
looks for the message in the broker's lists. The scan runs inside Redis (one script
call per queue) and only for ids that have no record.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import redis

from imageq.api_client.errors import InvalidInput
from imageq.api_client.kinds import JOB_KINDS
from imageq.api_client.names import job_queue
from imageq.api_client.queues import priority_lists
from imageq.api_client.records import RecordStore, connect, new_record
from imageq.api_client.schemas import JobRecord, parse_job
from imageq.api_client.scripts import script


@dataclass(frozen=True)
class QueuedMessage:
    """A job's message found in a queue list."""

    queue: str
    #: Messages that will be taken before this one (0: it is next).
    position: int
    task: str
    #: The job document (the message's one argument), or None if it cannot be read.
    document: dict[str, Any] | None


def find_queued(client: redis.Redis, queue: str, job_id: str) -> QueuedMessage | None:
    """The message of ``job_id`` waiting in ``queue`` (any priority), or None."""
    lists = priority_lists(queue)
    found = script(client, "find_in_queue")(keys=lists, args=[json.dumps(job_id), job_id])
    if not found:
        return None
    list_index, index, length, raw = int(found[0]), int(found[1]), int(found[2]), found[3]
    ahead = 0
    if list_index > 1:
        pipe = client.pipeline(transaction=False)
        for name in lists[: list_index - 1]:
            pipe.llen(name)
        ahead = int(sum(pipe.execute()))
    message = json.loads(raw)
    headers = message.get("headers") or {}
    return QueuedMessage(
        queue=queue,
        position=ahead + (length - index),
        task=str(headers.get("task", "")),
        document=_document(message),
    )


def _document(message: dict[str, Any]) -> dict[str, Any] | None:
    try:
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    if len(args) == 1 and isinstance(args[0], dict):
        return args[0]
    return None


def record_from_queue(store: RecordStore, records: redis.Redis, job_id: str) -> JobRecord | None:
    """The record of a job that waits in a queue but has none yet, created now (so it can
    be followed and canceled like any other; the worker finds it), with its position."""
    settings = store.settings
    for spec in JOB_KINDS.values():
        url = settings.long_broker_url if spec.long_job else settings.broker_url
        broker = records if url == settings.records_redis_url else connect(url)
        try:
            found = find_queued(broker, job_queue(spec.name, settings.queue_prefix), job_id)
        finally:
            if broker is not records:
                broker.close()
        if found is None:
            continue
        try:
            doc = parse_job(found.document).wire()
        except InvalidInput:
            # The worker will refuse it with a record of its own; until then it waits.
            doc = {"id": job_id, "kind": spec.name}
        if doc["id"] != job_id:
            return None
        record = new_record(doc)
        if "input" in doc:
            record, _ = store.create(record, doc)
        return record.model_copy(update={"queue_position": found.position})
    return None
