"""The one list of job kinds: everything that names a kind derives from it."""

from __future__ import annotations

import argparse

import pytest

from imageq.api_client.celery_config import celery_config
from imageq.api_client.inputs import CaptionInput, GenerateInput, JobInput
from imageq.api_client.kinds import (
    JOB_KINDS,
    KINDS,
    WORKER_KIND_SPECS,
    WORKER_KINDS,
    all_queues,
    served_kinds,
    worker_queues,
)
from imageq.api_client.names import WORKER_QUEUES, job_queue, task_name
from imageq.api_client.schemas import JobStatus, parse_job
from imageq.api_client.settings import Settings
from imageq.workers.ops.launch import WorkerSpec, celery_argv

IMG = "https://example.com/a.png"


def test_every_job_kind_is_served_by_exactly_its_worker_kind() -> None:
    for spec in JOB_KINDS.values():
        assert spec.worker_kind in WORKER_KIND_SPECS
        assert spec.name in served_kinds(spec.worker_kind)
        assert issubclass(spec.input_model, JobInput) and spec.input_model is not JobInput
    assert served_kinds("diffusion") == ("generate", "inpaint", "style")
    assert served_kinds("inpaint") == ("inpaint",)
    assert served_kinds("webhooks") == ()


def test_queues_and_routes_derive_from_the_registry() -> None:
    assert {kind: worker_queues(kind) for kind in WORKER_KINDS} == WORKER_QUEUES
    assert set(all_queues()) == {spec.queue for spec in JOB_KINDS.values()} | {"webhooks"}
    routes = celery_config(Settings.from_env({}, queue_prefix="p-"))["task_routes"]
    for kind in KINDS:
        assert routes[task_name(kind)] == {"queue": job_queue(kind, "p-")}
        assert task_name(kind) == f"imageq.{kind}"


def test_only_long_jobs_use_the_long_broker() -> None:
    assert [k for k, spec in JOB_KINDS.items() if spec.long_job] == ["finetune"]


def test_a_finetune_worker_runs_one_job_whatever_the_concurrency_settings() -> None:
    # One pool thread, not Celery's solo pool (docs/finetune.md): the overrides that
    # size other pools must not put two fine-tunes on one device.
    settings = Settings.from_env({"IMAGEQ_WORKER_CONCURRENCY": "8"})
    argv = celery_argv(WorkerSpec(kind="finetune", device="cpu", concurrency=4), settings)
    assert argv[argv.index("-P") + 1] == "threads"
    assert argv[argv.index("-c") + 1] == "1"
    caption = celery_argv(WorkerSpec(kind="caption", device="cpu"), settings)
    assert caption[caption.index("-c") + 1] == "8"


@pytest.mark.parametrize("worker_kind", WORKER_KINDS)
def test_every_worker_kind_launches(worker_kind: str) -> None:
    settings = Settings.from_env({})
    argv = celery_argv(WorkerSpec(kind=worker_kind, device="cpu"), settings)
    queues = argv[argv.index("-Q") + 1].split(",")
    assert queues == list(worker_queues(worker_kind))
    assert argv[argv.index("-P") + 1] == "threads"
    in_flight = int(argv[argv.index("-c") + 1])
    assert in_flight == 1 if WORKER_KIND_SPECS[worker_kind].in_flight == "one" else in_flight > 1
    spec = WORKER_KIND_SPECS[worker_kind]
    if spec.builder:
        module, _, func = spec.builder.partition(":")
        assert module.startswith("imageq.workers.kinds.") and func
        assert isinstance(getattr(settings, spec.model_setting), str)


def test_command_line_choices_are_the_registry() -> None:
    from imageq.api_client.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    submit = sub.choices["submit"]
    kind = next(a for a in submit._actions if a.dest == "kind")
    assert tuple(kind.choices or ()) == KINDS


def test_a_document_carries_its_kinds_typed_input_validated_once() -> None:
    doc = parse_job({"id": "a-1", "kind": "caption", "input": {"image": IMG}})
    assert isinstance(doc.input, CaptionInput) and doc.input.images == [IMG]
    wire = doc.wire()
    # The stored form carries the kind's fields, so a redelivery validates the same job.
    assert wire["input"]["images"] == [IMG]
    again = parse_job(wire)
    assert again == doc
    gen = parse_job({"id": "g-1", "kind": "generate", "input": {"prompt": "a cat"}})
    assert isinstance(gen.input, GenerateInput) and gen.input.steps == 25


def test_status_is_a_string_enum() -> None:
    assert JobStatus.SUCCEEDED == "succeeded" and JobStatus.SUCCEEDED.is_final
    assert not JobStatus.RUNNING.is_final
    assert [str(s) for s in JobStatus] == ["queued", "running", "succeeded", "failed", "canceled"]
