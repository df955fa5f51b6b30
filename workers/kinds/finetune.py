"""Finetune jobs: LoRA for the SD UNet (``diffusion``) or BLIP's text decoder (``caption``).

One job at a time per worker (one pool thread, prefetch 1, on the finetune broker
whose visibility timeout outlasts a run; the job's lease keeps a redelivered copy
waiting while this one lives). A job: check the adapter name, fetch and validate the
dataset, caption what lacks a text (``auto_caption``), cache latents or image
embeddings, train with checkpoints (resuming from the newest complete one), publish
the adapter (a new revision folder under ``adapters/{name}/``, or
``adapters/_tenants/{tenant}/{name}/`` for a tenant's job, then the registry entry
switched to it) and return what it published.
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from imageq.api_client.adapters import adapter_field
from imageq.api_client.errors import InvalidInput, ModelError
from imageq.api_client.inputs import FinetuneInput
from imageq.api_client.schemas import JobDocument
from imageq.api_client.settings import Settings
from imageq.workers.io.adapter_registry import AdapterRegistry
from imageq.workers.runtime.control import JobControl
from imageq.workers.runtime.lifecycle import Built, WorkerContext
from imageq.workers.training.datasets import Dataset, load_dataset, remove_tree
from imageq.workers.training.loop import LoopConfig, LoopResult, Trainer, run_training

log = logging.getLogger(__name__)

INFO_FILE = "imageq_adapter.json"


def work_root(settings: Settings) -> Path:
    if settings.finetune_work_dir:
        return Path(settings.finetune_work_dir)
    return Path(tempfile.gettempdir()) / "imageq-finetune"


class FinetuneHandler:
    def __init__(self, ctx: WorkerContext, device: str, registry: AdapterRegistry) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.device = device
        self.registry = registry

    def base_model(self, target: str) -> str:
        return self.settings.model_caption if target == "caption" else self.settings.model_diffusion

    def handle(self, job: JobDocument, inp: FinetuneInput, control: JobControl) -> dict[str, Any]:
        # On SIGTERM a fine-tune stops at its next step and resumes on another worker
        # from the checkpoint it saves there, instead of holding the worker for hours.
        control.hands_back = True
        self.check_name(job.id, inp, job.tenant)
        work = work_root(self.settings) / job.id
        remove_tree(work)  # a crashed attempt's leftovers
        began = time.monotonic()
        try:
            return self._run(job.id, inp, control, work, job.tenant)
        finally:
            # A fine-tune holds its worker's device for the whole run (models load per
            # job, auto_caption included): all of it is the job's model time.
            control.charge_model(time.monotonic() - began)
            remove_tree(work)
            # The models went with _run's frame; hand their cached blocks back too, so an
            # idle finetune worker holds no GPU memory.
            if self.device.startswith("cuda"):
                import torch

                gc.collect()
                torch.cuda.empty_cache()

    def _run(
        self,
        job_id: str,
        inp: FinetuneInput,
        control: JobControl,
        work: Path,
        tenant: str | None = None,
    ) -> dict[str, Any]:
        dataset = self._dataset(job_id, inp, control, work)
        control(0, inp.max_steps, {"stage": "preparing"})
        trainer = self._trainer(inp, dataset, work)
        result = self._train(job_id, inp, dataset, trainer, control)
        # Trained: publishing takes seconds, so a SIGTERM now waits for it.
        control.hands_back = False
        control(inp.max_steps, inp.max_steps, {"stage": "publishing"})
        return self._publish(job_id, inp, dataset, trainer, result, control, tenant)

    # -- before training ----------------------------------------------------------------
    def check_name(self, job_id: str, inp: FinetuneInput, tenant: str | None = None) -> None:
        """Refuse to train for a name that is taken in the job's own namespace (its
        tenant's, or the shared one without a tenant), unless overwrite (or it is ours).
        A tenant's adapter may shadow a shared one of its name, never replace it."""
        entry = self.registry.entry(adapter_field(inp.name, tenant))
        if entry is not None and not inp.overwrite and entry.get("job_id") != job_id:
            raise InvalidInput(
                f"input.name: adapter {inp.name!r} exists (from job {entry.get('job_id')}); "
                "set overwrite to replace it"
            )

    def _dataset(self, job_id: str, inp: FinetuneInput, control: JobControl, work: Path) -> Dataset:
        control(0, inp.max_steps, {"stage": "dataset"})
        dataset = load_dataset(
            inp.dataset,
            work / "dataset",
            self.settings,
            self.ctx.storage,
            allow_missing_text=inp.auto_caption,
        )
        missing = dataset.missing_text()
        control.metrics["examples"] = len(dataset)
        if not missing:
            return dataset
        from imageq.workers.training.autocaption import auto_caption

        def progress(done: int, total: int) -> None:
            # Steps of this stage (images captioned), so each report is its own event.
            control(done, total, {"stage": "auto_caption", "captioned": done, "of": total})

        # In this process, on this job's time: no caption jobs outside the tenant's limits.
        texts = auto_caption(missing, self.settings, self.device, control.check, progress)
        control.metrics["auto_captioned"] = len(texts)
        # Kept beside the outputs, so a user can see what the model trained on.
        self.ctx.put_output(
            job_id, "auto_captions.json", json.dumps(texts, indent=1).encode(), "application/json"
        )
        return dataset.with_texts(texts)

    def _trainer(self, inp: FinetuneInput, dataset: Dataset, work: Path) -> Trainer:
        if inp.target == "caption":
            from imageq.workers.training.lora_caption import CaptionTrainer
            from imageq.workers.training.vocabulary import fetch_tokenizer

            vocabulary = inp.vocabulary
            tokenizer_dir = None
            if vocabulary is not None and vocabulary.tokenizer is not None:
                ref, storage = vocabulary.tokenizer, self.ctx.storage
                tokenizer_dir = fetch_tokenizer(ref, work / "tokenizer", self.settings, storage)
            return CaptionTrainer(
                self.settings,
                self.device,
                dataset,
                rank=inp.rank,
                alpha=inp.alpha,
                language=inp.language,
                vocabulary=vocabulary,
                tokenizer_dir=tokenizer_dir,
                seed=inp.seed,
            )
        from imageq.workers.training.lora_diffusion import DiffusionTrainer

        return DiffusionTrainer(
            self.settings,
            self.device,
            dataset,
            rank=inp.rank,
            alpha=inp.alpha,
            resolution=inp.resolution,
        )

    # -- training -----------------------------------------------------------------------
    def _train(
        self,
        job_id: str,
        inp: FinetuneInput,
        dataset: Dataset,
        trainer: Trainer,
        control: JobControl,
    ) -> LoopResult:
        from imageq.workers.training.checkpoints import CheckpointStore

        checkpoints = CheckpointStore(
            self.ctx.storage,
            f"jobs/{job_id}/checkpoints/",
            keep=self.settings.finetune_keep_checkpoints,
            guard=control.hold,
        )
        config = LoopConfig(
            max_steps=inp.max_steps,
            batch_size=inp.batch_size,
            learning_rate=inp.learning_rate,
            checkpoint_every=inp.checkpoint_every,
            seed=inp.seed,
            examples=len(dataset),
        )

        def on_checkpoint(step: int, uri: str) -> None:
            # In the metrics, so a canceled or timed-out job's record names what it kept.
            control.metrics["last_checkpoint_step"] = step
            control.metrics["last_checkpoint"] = uri

        result = run_training(
            trainer, config, checkpoints, control, on_checkpoint, control.hand_back_requested
        )
        # What storage still holds (older ones are pruned), not every step ever saved.
        result.checkpoints = checkpoints.steps()
        control.metrics.update(
            resumed_from_step=result.resumed_from_step,
            steps_run=result.steps_run,
            train_s=result.train_s,
            samples_per_s=result.samples_per_s,
        )
        return result

    # -- after training -----------------------------------------------------------------
    def _publish(
        self,
        job_id: str,
        inp: FinetuneInput,
        dataset: Dataset,
        trainer: Trainer,
        result: LoopResult,
        control: JobControl,
        tenant: str | None = None,
    ) -> dict[str, Any]:
        base_model = self.base_model(inp.target)
        metrics = {
            "steps": result.steps,
            "first_loss": result.first_loss,
            "final_loss": result.final_loss,
            "examples": len(dataset),
            "samples_per_s": result.samples_per_s,
        }
        info: dict[str, Any] = {
            "target": inp.target,
            "base_model": base_model,
            "job_id": job_id,
            "rank": inp.rank,
            "alpha": inp.alpha,
            "metrics": metrics,
        }
        if inp.target == "diffusion":
            info["resolution"] = inp.resolution
        # A caption adapter's language and vocabulary (CaptionTrainer.published_info).
        published_info = getattr(trainer, "published_info", None)
        if callable(published_info):
            info.update(published_info())
        files = trainer.export()
        files[INFO_FILE] = json.dumps(info, indent=1).encode()
        # Ours already when a crash came between publishing and the final record.
        own = (self.registry.entry(adapter_field(inp.name, tenant)) or {}).get("job_id") == job_id
        entry = self.registry.publish(
            inp.name, files, info, overwrite=inp.overwrite or own, guard=control.hold, tenant=tenant
        )
        log.info("job %s published adapter %s (%s)", job_id, inp.name, entry["uri"])
        # A storage URI names a key, so the folder's URI is its key's plus the slash.
        store = self.ctx.storage.uri(f"jobs/{job_id}/checkpoints") + "/"
        return {
            "name": inp.name,
            "uri": entry["uri"],
            "target": inp.target,
            "base_model": base_model,
            "version": entry["version"],
            "steps": result.steps,
            "final_loss": result.final_loss,
            "first_loss": result.first_loss,
            "loss_curve": result.curve,
            "resumed_from_step": result.resumed_from_step,
            "checkpoints": {
                "uri": store,
                "steps": result.checkpoints,
            },
            **{k: info[k] for k in ("language", "vocabulary") if k in info},
        }


def build(ctx: WorkerContext, device: str) -> Built:
    """The finetune worker: models load per job (a LoRA run changes them), so start-up
    only checks that the models it would train exist."""
    from imageq.workers.predictors.caption import check_local_model

    settings = ctx.settings
    problems = []
    for target, model in (
        ("caption", settings.model_caption),
        ("diffusion", settings.model_diffusion),
    ):
        try:
            check_local_model(model)
        except ModelError as exc:
            problems.append(f"{target}: {exc.message}")
    if len(problems) == 2:
        raise ModelError("no model to fine-tune: " + "; ".join(problems))
    for problem in problems:
        log.warning("finetune jobs for %s will fail: %s", problem.split(":")[0], problem)
    work_root(settings).mkdir(parents=True, exist_ok=True)
    # This worker publishes but never downloads adapters: the cache folder stays unused.
    cache = Path(settings.adapter_cache_dir or tempfile.gettempdir())
    registry = AdapterRegistry(ctx.store, ctx.storage, cache)
    return {"finetune": FinetuneHandler(ctx, device, registry)}, []
