"""Generate, inpaint and style jobs on one warm Stable Diffusion pipeline.

``imageq worker diffusion`` serves all three queues with one pipeline (img2img and
inpaint share its modules); ``imageq worker inpaint`` serves inpaint from a dedicated
inpainting checkpoint. Jobs run on Celery threads and do their own I/O (images in,
adapters, PNGs out) there; the pipeline itself belongs to one thread, the
``PipelineQueue``, which runs one call at a time and lets compatible generate jobs that
wait share a call (each still gets exactly its own images: see the predictor).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from api_client.errors import ImageqError, InvalidInput, ModelError, OutOfMemory
from api_client.schemas import AdapterRef, GenerateInput, InpaintInput, JobDocument, StyleInput
from workers.io.adapter_registry import AdapterRegistry
from workers.io.images import load_image
from workers.predictors.diffusion import (
    NO_IP_ADAPTER,
    BatchInterrupted,
    DiffusionPredictor,
    GeneratedImage,
)
from workers.predictors.diffusion_png import check_pixels, check_strength, fit_mask, fit_size
from workers.runtime.control import JobControl
from workers.runtime.lifecycle import Built, WorkerContext

log = logging.getLogger(__name__)

# How often a job waiting for the pipeline looks for a cancel or its deadline.
WAIT_POLL_S = 0.25


@dataclass
class CallResult:
    images: list[GeneratedImage]
    #: Images and jobs in the pipeline call that made them (batched generate jobs share one).
    batch_size: int
    batch_jobs: int
    pipeline_s: float


@dataclass(eq=False)
class _Work:
    control: JobControl
    # Generate jobs carry their input (they may share a call); the others a closure.
    inp: GenerateInput | None = None
    run: Callable[[], list[GeneratedImage]] | None = None
    key: Hashable = None
    # Set after a batch failed as a whole: the job runs alone next time.
    solo: bool = False
    future: Future[CallResult] = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)

    @property
    def images(self) -> int:
        return self.inp.num_images if self.inp is not None else 0


class PipelineQueue:
    """The one thread that runs pipeline calls, first come first served.

    A generate job at the head of the queue waits up to ``max_wait_ms`` for company,
    then runs with every waiting job of equal ``batch_key`` that fits in
    ``max_batch_images``. A step callback that raises (cancel, timeout) ends only its
    own job; the others of its batch go back to the head of the queue. Out of memory
    with several jobs halves the batch limit and runs them again.
    """

    def __init__(
        self, predictor: DiffusionPredictor, max_batch_images: int, max_wait_ms: int
    ) -> None:
        self.predictor = predictor
        self.max_batch_images = max(1, max_batch_images)
        self.max_wait_s = max(0, max_wait_ms) / 1000.0
        self._pending: list[_Work] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.calls = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="imageq-pipeline", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Refuse new work, finish what waits, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    # -- job threads ------------------------------------------------------------------
    def generate(self, inp: GenerateInput, control: JobControl) -> CallResult:
        return self._wait(self._submit(_Work(control, inp=inp, key=self.predictor.batch_key(inp))))

    def call(self, run: Callable[[], list[GeneratedImage]], control: JobControl) -> CallResult:
        return self._wait(self._submit(_Work(control, run=run)))

    def _submit(self, work: _Work) -> _Work:
        with self._cond:
            if self._stopping:
                raise ModelError("the worker is shutting down")
            self._pending.append(work)
            self._cond.notify_all()
        return work

    def _wait(self, work: _Work) -> CallResult:
        while True:
            try:
                return work.future.result(timeout=WAIT_POLL_S)
            except TimeoutError:
                pass
            with self._cond:
                waiting = work in self._pending
            if not waiting:
                continue  # running: its step callback stops it
            try:
                # A canceled or late job leaves the queue now, not when its turn comes.
                work.control.check()
            except ImageqError:
                with self._cond:
                    if work in self._pending:
                        self._pending.remove(work)
                        raise

    # -- the pipeline thread ----------------------------------------------------------
    def _take(self) -> list[_Work] | None:
        with self._cond:
            while not self._pending:
                if self._stopping:
                    return None
                self._cond.wait(0.5)
            first = self._pending[0]
            batch = [first]
            if first.inp is not None and not first.solo:
                deadline = first.enqueued_at + self.max_wait_s
                while True:
                    batch = self._compatible(first)
                    remaining = deadline - time.monotonic()
                    full = sum(w.images for w in batch) >= self.max_batch_images
                    if full or remaining <= 0 or self._stopping:
                        break
                    self._cond.wait(remaining)
            for work in batch:
                self._pending.remove(work)
            return batch

    def _compatible(self, first: _Work) -> list[_Work]:
        batch, images = [first], first.images
        for work in self._pending[1:]:
            if (
                work.inp is not None
                and not work.solo
                and work.key == first.key
                and images + work.images <= self.max_batch_images
            ):
                batch.append(work)
                images += work.images
        return batch

    def _requeue(self, works: list[_Work]) -> None:
        with self._cond:
            self._pending[0:0] = works
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            live = [work for work in batch if self._still_wanted(work)]
            try:
                if live and live[0].inp is None:
                    self._run_call(live[0])
                elif live:
                    self._run_generate(live)
            except BaseException as exc:  # never leave a job thread waiting forever
                for work in live:
                    if not work.future.done():
                        work.future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise

    def _still_wanted(self, work: _Work) -> bool:
        try:
            work.control.check()
        except Exception as exc:
            work.future.set_exception(exc)
            return False
        return True

    def _run_call(self, work: _Work) -> None:
        assert work.run is not None
        started = time.monotonic()
        try:
            images = work.run()
        except Exception as exc:
            work.future.set_exception(exc)
            return
        self.calls += 1
        work.future.set_result(CallResult(images, len(images), 1, time.monotonic() - started))

    def _run_generate(self, batch: list[_Work]) -> None:
        inps = [work.inp for work in batch if work.inp is not None]
        controls = [work.control for work in batch]
        started = time.monotonic()
        try:
            if len(batch) == 1:
                results = [self.predictor.run_generate(inps[0], controls[0])]
            else:
                results = self.predictor.run_generate_batch(inps, controls)
        except BatchInterrupted as stop:
            batch[stop.job_index].future.set_exception(stop.error)
            self._requeue([w for i, w in enumerate(batch) if i != stop.job_index])
            return
        except OutOfMemory as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            count = sum(w.images for w in batch)
            self.max_batch_images = max(1, min(self.max_batch_images, count // 2))
            log.warning("out of memory at %d images; batches now %d", count, self.max_batch_images)
            self._requeue(batch)
            return
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            # One job's trouble must not fail the others: each runs alone next.
            for work in batch:
                work.solo = True
            self._requeue(batch)
            return
        self.calls += 1
        elapsed = time.monotonic() - started
        total = sum(len(images) for images in results)
        for work, images in zip(batch, results, strict=True):
            work.future.set_result(CallResult(images, total, len(batch), elapsed))


class DiffusionHandler:
    """Serves generate, inpaint and style: validates and fetches on the job's thread,
    then queues the pipeline call."""

    def __init__(
        self,
        ctx: WorkerContext,
        predictor: DiffusionPredictor,
        queue: PipelineQueue,
        registry: AdapterRegistry,
    ) -> None:
        self.ctx = ctx
        self.predictor = predictor
        self.queue = queue
        self.registry = registry

    def handle(self, job: JobDocument, inp: Any, control: JobControl) -> dict[str, Any]:
        if isinstance(inp, GenerateInput):
            result = self._generate(inp, control)
        elif isinstance(inp, InpaintInput):
            result = self._inpaint(inp, control)
        elif isinstance(inp, StyleInput):
            result = self._style(inp, control)
        else:
            raise InvalidInput(f"kind: a diffusion worker does not serve {job.kind!r}")
        control.metrics.update(
            batch_size=result.batch_size,
            batch_jobs=result.batch_jobs,
            images=len(result.images),
            pipeline_s=round(result.pipeline_s, 4),
        )
        # A cancel that came after the last step still keeps the outputs out of storage.
        control.check()
        return self._output(job.id, result.images)

    def _generate(self, inp: GenerateInput, control: JobControl) -> CallResult:
        check_pixels(inp.width, inp.height, self.ctx.settings.max_output_pixels)
        self._fetch_adapters(inp.adapters)
        return self.queue.generate(inp, control)

    def _inpaint(self, inp: InpaintInput, control: JobControl) -> CallResult:
        image = self._load("image", inp.image)
        mask = self._load("mask", inp.mask)
        # The checks run_inpaint makes, made here so that bad input never waits for the GPU.
        fit_mask(mask, image.size, self._output_size(image))
        check_strength(inp.steps, inp.strength)
        self._fetch_adapters(inp.adapters)
        control.check()
        return self.queue.call(
            lambda: self.predictor.run_inpaint(inp, image, mask, control), control
        )

    def _style(self, inp: StyleInput, control: JobControl) -> CallResult:
        if inp.style_image is not None and not self.predictor.has_ip_adapter:
            raise InvalidInput(NO_IP_ADAPTER)
        image = self._load("image", inp.image)
        style = None if inp.style_image is None else self._load("style_image", inp.style_image)
        self._output_size(image)
        check_strength(inp.steps, inp.strength)
        self._fetch_adapters(inp.adapters)
        control.check()
        return self.queue.call(
            lambda: self.predictor.run_style(inp, image, style, control), control
        )

    def _output_size(self, image: Image.Image) -> tuple[int, int]:
        width, height = image.size
        return fit_size(width, height, self.ctx.settings.max_output_pixels)

    def _load(self, name: str, ref: str) -> Image.Image:
        try:
            return load_image(ref, self.ctx.settings, self.ctx.storage)
        except ImageqError as exc:
            raise type(exc)(f"input.{name}: {exc.message}") from None

    def _fetch_adapters(self, refs: list[AdapterRef]) -> None:
        """Resolve and download the adapters now: an unknown name fails before GPU work,
        and the pipeline thread then finds them in the local cache."""
        names = [ref.name for ref in refs]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise InvalidInput(f"adapters: {', '.join(map(repr, repeated))} listed twice")
        for name in names:
            self.registry.local_dir(name)

    def _output(self, job_id: str, images: list[GeneratedImage]) -> dict[str, Any]:
        entries = []
        for index, image in enumerate(images):
            ref = self.ctx.put_output(job_id, f"image-{index}.png", image.png, "image/png")
            entry: dict[str, Any] = {
                **ref,
                "seed": image.seed,
                "width": image.width,
                "height": image.height,
            }
            if self.ctx.settings.safety_checker:
                entry["nsfw"] = image.nsfw
            entries.append(entry)
        # What all images share; each image's own seed is in its entry and its PNG.
        parameters = {k: v for k, v in images[0].parameters.items() if k != "seed"}
        return {
            "images": entries,
            "seeds": [image.seed for image in images],
            "parameters": parameters,
        }


def _registry(ctx: WorkerContext) -> tuple[AdapterRegistry, Callable[[], None]]:
    configured = ctx.settings.adapter_cache_dir
    if configured:
        return AdapterRegistry(ctx.store, ctx.storage, Path(configured)), lambda: None
    cache = Path(tempfile.mkdtemp(prefix="imageq-adapters-"))
    registry = AdapterRegistry(ctx.store, ctx.storage, cache)
    return registry, lambda: shutil.rmtree(cache, ignore_errors=True)


def _build(ctx: WorkerContext, device: str, inpaint_only: bool) -> Built:
    settings = ctx.settings
    registry, remove_cache = _registry(ctx)
    predictor = DiffusionPredictor(
        settings.model_inpaint if inpaint_only else settings.model_diffusion,
        settings=settings,
        inpaint_only=inpaint_only,
        # Names are resolved per job, so an adapter published now serves the next job.
        adapter_path=registry.local_dir,
        max_loaded_adapters=settings.max_loaded_adapters,
    )
    try:
        predictor.setup(device)
    except BaseException:
        remove_cache()
        raise
    queue = PipelineQueue(
        predictor, settings.max_diffusion_batch_images, settings.max_batch_wait_ms
    )
    queue.start()
    handler = DiffusionHandler(ctx, predictor, queue, registry)
    kinds = ("inpaint",) if inpaint_only else ("generate", "inpaint", "style")
    return {kind: handler for kind in kinds}, [queue.stop, remove_cache]


def build(ctx: WorkerContext, device: str) -> Built:
    """The diffusion worker: one warm SD pipeline (IMAGEQ_MODEL_DIFFUSION) for all three."""
    return _build(ctx, device, inpaint_only=False)


def build_inpaint(ctx: WorkerContext, device: str) -> Built:
    """The inpaint worker: a dedicated inpainting checkpoint (IMAGEQ_MODEL_INPAINT)."""
    return _build(ctx, device, inpaint_only=True)
