"""The one list of job kinds and worker kinds (DESIGN §2, §7).

Task names, queues, input validation, settings defaults, the command line's choices,
the launcher and the worker builders all derive from these two tables. Adding a job
kind is one ``KindSpec`` here, an input model in ``inputs.py``, a handler and a
predictor in ``workers/``; a new kind of worker is one ``WorkerKind`` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from imageq.api_client.inputs import (
    CaptionInput,
    FinetuneInput,
    GenerateInput,
    InpaintInput,
    JobInput,
    MatchInput,
    StyleInput,
)

#: How many jobs a worker holds at once: two batches' worth, a few waiting for the one
#: pipeline, many network-bound deliveries, or one.
InFlight = Literal["batch", "pipeline", "io", "one"]

#: Webhook delivery's own queue, served by the light webhooks worker.
WEBHOOK_QUEUE = "webhooks"


@dataclass(frozen=True)
class KindSpec:
    """One job kind: what a producer enqueues and which worker serves it."""

    name: str
    #: The queue's base name; ``IMAGEQ_QUEUE_PREFIX`` goes in front.
    queue: str
    input_model: type[JobInput]
    #: The worker kind that serves this queue by default.
    worker_kind: str
    #: Long jobs go to their own broker database with a visibility timeout of days.
    long_job: bool = False

    @property
    def task_name(self) -> str:
        return f"imageq.{self.name}"


@dataclass(frozen=True)
class WorkerKind:
    """One kind of worker process: ``imageq worker NAME``."""

    name: str
    #: The settings field naming its model (``IMAGEQ_MODEL_...``); empty: no model.
    model_setting: str = ""
    #: ``module:function`` that builds its handlers, imported only in that worker.
    builder: str = ""
    #: Job kinds it serves; empty: the kinds whose ``worker_kind`` is this one.
    serves: tuple[str, ...] = ()
    in_flight: InFlight = "one"


JOB_KINDS: dict[str, KindSpec] = {
    spec.name: spec
    for spec in (
        KindSpec("caption", "caption", CaptionInput, "caption"),
        KindSpec("match", "match", MatchInput, "match"),
        KindSpec("generate", "generate", GenerateInput, "diffusion"),
        KindSpec("inpaint", "inpaint", InpaintInput, "diffusion"),
        KindSpec("style", "style", StyleInput, "diffusion"),
        KindSpec("finetune", "finetune", FinetuneInput, "finetune", long_job=True),
    )
}

WORKER_KIND_SPECS: dict[str, WorkerKind] = {
    spec.name: spec
    for spec in (
        WorkerKind(
            "caption", "model_caption", "imageq.workers.kinds.caption:build", in_flight="batch"
        ),
        WorkerKind("match", "model_match", "imageq.workers.kinds.match:build", in_flight="batch"),
        WorkerKind(
            "diffusion",
            "model_diffusion",
            "imageq.workers.kinds.diffusion:build",
            in_flight="pipeline",
        ),
        # A dedicated inpainting checkpoint for the inpaint queue only.
        WorkerKind(
            "inpaint",
            "model_inpaint",
            "imageq.workers.kinds.diffusion:build_inpaint",
            serves=("inpaint",),
            in_flight="pipeline",
        ),
        # Trains on top of the diffusion model (or BLIP, chosen per job).
        WorkerKind("finetune", "model_diffusion", "imageq.workers.kinds.finetune:build"),
        WorkerKind("webhooks", in_flight="io"),
    )
}

KINDS: tuple[str, ...] = tuple(JOB_KINDS)
WORKER_KINDS: tuple[str, ...] = tuple(WORKER_KIND_SPECS)


def served_kinds(worker_kind: str) -> tuple[str, ...]:
    """The job kinds a worker kind serves (the webhooks worker serves none)."""
    spec = WORKER_KIND_SPECS[worker_kind]
    if spec.serves:
        return spec.serves
    return tuple(k.name for k in JOB_KINDS.values() if k.worker_kind == worker_kind)


def worker_queues(worker_kind: str) -> tuple[str, ...]:
    """Base names of the queues a worker kind consumes by default."""
    if worker_kind == "webhooks":
        return (WEBHOOK_QUEUE,)
    return tuple(JOB_KINDS[k].queue for k in served_kinds(worker_kind))


def all_queues() -> tuple[str, ...]:
    """Every queue a deployment has (base names), each once."""
    return tuple(dict.fromkeys(q for w in WORKER_KINDS for q in worker_queues(w)))
