"""Generate, inpaint and style jobs on one warm Stable Diffusion pipeline.

``imageq worker diffusion`` serves all three queues with one pipeline (img2img and
inpaint share its modules); ``imageq worker inpaint`` serves inpaint from a dedicated
inpainting checkpoint. Jobs run on Celery threads and do their own I/O (images in,
adapters, PNGs out) there; the pipeline itself belongs to one thread, the micro-batcher
(``pipeline_batcher``), which runs one call at a time and lets compatible generate jobs
that wait share a call (each still gets exactly its own images: see the predictor).
"""

from __future__ import annotations

import io
import logging
import shutil
import tempfile
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from imageq.api_client.adapters import adapter_field, entry_tenant
from imageq.api_client.errors import ImageqError, InvalidInput
from imageq.api_client.inputs import AdapterRef, GenerateInput, InpaintInput, StyleInput
from imageq.api_client.object_urls import PREVIEW_FILE
from imageq.api_client.schemas import JobDocument
from imageq.api_client.settings import Settings
from imageq.api_client.uploads import IMAGE_TYPES, sniff_format
from imageq.workers.io.adapter_registry import AdapterRegistry
from imageq.workers.io.images import decode_image
from imageq.workers.io.job_images import Named, fetch_all, field_error
from imageq.workers.kinds.diffusion_previews import PreviewPublisher
from imageq.workers.predictors.base import Batched
from imageq.workers.predictors.diffusion import (
    NO_IP_ADAPTER,
    DiffusionPredictor,
    GeneratedImage,
    GenerateJob,
)
from imageq.workers.predictors.diffusion_png import check_pixels, check_strength, fit_mask, fit_size
from imageq.workers.predictors.previews import PREVIEW_MEDIA_TYPE, PreviewDecoder, open_decoder
from imageq.workers.provenance.signing import UNSIGNED_WARNING, Claim, Ingredient, ProvenanceSigner
from imageq.workers.runtime.batching import Batcher
from imageq.workers.runtime.control import JobControl
from imageq.workers.runtime.lifecycle import Built, WorkerContext


@dataclass(frozen=True)
class AloneCall:
    """An inpaint or style job's pipeline call: a closure that always runs alone."""

    run: Callable[[], list[GeneratedImage]]
    #: The images it makes: its cost, and its call's ``batch_size``.
    images: int
    #: The input image, for the outputs' C2PA manifests (``None`` when unsigned).
    ingredient: Ingredient | None = None


#: What a job hands the pipeline thread: generate jobs of equal key may share a call.
PipelineCall = GenerateJob | AloneCall
DiffusionBatcher = Batcher[PipelineCall, list[GeneratedImage]]


class PipelineCalls(Batched[PipelineCall, list[GeneratedImage]]):
    """The batcher's model for a diffusion worker: generate jobs share the predictor's
    ``predict``; an ``AloneCall`` (key ``None``) runs by itself."""

    def __init__(self, predictor: Batched[GenerateJob, list[GeneratedImage]]) -> None:
        self.predictor = predictor

    def batch_key(self, item: PipelineCall) -> Hashable:
        return None if isinstance(item, AloneCall) else self.predictor.batch_key(item)

    def predict(self, batch: Sequence[PipelineCall]) -> list[list[GeneratedImage]]:
        if batch and isinstance(batch[0], AloneCall):
            # Its key is None: the batcher always hands it over by itself.
            return [batch[0].run()]
        return self.predictor.predict([item for item in batch if isinstance(item, GenerateJob)])


def _images(item: PipelineCall) -> int:
    return item.images if isinstance(item, AloneCall) else item.inp.num_images


def pipeline_batcher(
    predictor: Batched[GenerateJob, list[GeneratedImage]], max_batch_images: int, max_wait_ms: int
) -> DiffusionBatcher:
    """The one thread that runs pipeline calls, first come first served.

    Generate jobs that wait together with equal ``batch_key`` share a call of up to
    ``max_batch_images`` images; a step callback that raises (cancel, timeout) ends only
    its own job and the others of its call run again (see ``imageq.workers.runtime.batching``).
    """
    return Batcher(
        PipelineCalls(predictor),
        max_batch=max_batch_images,
        max_wait_ms=max_wait_ms,
        cost=_images,
        name="imageq-pipeline",
    )


log = logging.getLogger(__name__)


class DiffusionHandler:
    """Serves generate, inpaint and style: validates and fetches on the job's thread,
    then queues the pipeline call; encodes and signs the outputs on the job's thread."""

    def __init__(
        self,
        ctx: WorkerContext,
        predictor: DiffusionPredictor,
        batcher: DiffusionBatcher,
        registry: AdapterRegistry,
        signer: ProvenanceSigner | None = None,
        previews: PreviewDecoder | None = None,
        preview_executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.ctx = ctx
        self.predictor = predictor
        self.batcher = batcher
        self.registry = registry
        self.signer = signer
        #: None: IMAGEQ_PREVIEWS is off on this worker.
        self.previews = previews
        self.preview_executor = preview_executor

    def _publisher(
        self, job: JobDocument, inp: Any, control: JobControl
    ) -> PreviewPublisher | None:
        if self.previews is None or self.preview_executor is None:
            return None
        if not getattr(inp, "previews", False):
            return None

        def store(data: bytes) -> dict[str, Any]:
            return dict(self.ctx.put_output(job.id, PREVIEW_FILE, data, PREVIEW_MEDIA_TYPE))

        interval_s = self.ctx.settings.preview_interval_ms / 1000
        return PreviewPublisher(
            self.previews, self.preview_executor, store, control.preview, interval_s
        )

    def handle(self, job: JobDocument, inp: Any, control: JobControl) -> dict[str, Any]:
        asked = list(getattr(inp, "adapters", []))
        previews = self._publisher(job, inp, control)
        try:
            with self.batcher.incoming() as ticket:
                owned = self._owned_adapters(inp, job.tenant)
                call = self._prepare(job, owned, control, previews)
                charge = control.charge_model
                ran = self.batcher.run([call], control.check, ticket, charge=charge)[0]
        finally:
            if previews is not None:
                previews.close()
        control.metrics.update(
            batch_size=ran.batch_size,
            batch_jobs=ran.batch_items,
            images=len(ran.result),
            pipeline_s=round(ran.run_s, 4),
        )
        # A cancel that came after the last step still keeps the outputs out of storage.
        control.check()
        ingredient = call.ingredient if isinstance(call, AloneCall) else None
        return self._output(job.id, ran.result, asked, ingredient)

    def _owned_adapters(self, inp: Any, tenant: str | None) -> Any:
        """``inp`` with each adapter named by its registry field (owner and name, see
        ``imageq.api_client.adapters``): resolved with the job's tenant, its own first, then the
        shared one. The pipeline's adapter cache and batch keys then tell two tenants'
        adapters of one name apart. Another tenant's adapter is unknown, like a missing one.
        """
        refs: list[AdapterRef] = list(getattr(inp, "adapters", []))
        if not refs:
            return inp
        names = [ref.name for ref in refs]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise InvalidInput(f"adapters: {', '.join(map(repr, repeated))} listed twice")
        owned = []
        for ref in refs:
            entry = self.registry.get(ref.name, tenant)
            if entry is None:
                raise InvalidInput(f"adapters: no adapter named {ref.name!r} in the registry")
            field = adapter_field(ref.name, entry_tenant(entry))
            # model_construct: a field holds "/", which a name typed by a user may not.
            owned.append(AdapterRef.model_construct(name=field, scale=ref.scale))
        return inp.model_copy(update={"adapters": owned})

    def _prepare(
        self, job: JobDocument, inp: Any, control: JobControl, previews: PreviewPublisher | None
    ) -> PipelineCall:
        if isinstance(inp, GenerateInput):
            return self._generate(inp, control, previews)
        if isinstance(inp, InpaintInput):
            return self._inpaint(inp, control, previews)
        if isinstance(inp, StyleInput):
            return self._style(inp, control, previews)
        raise InvalidInput(f"kind: a diffusion worker does not serve {job.kind!r}")

    def _generate(
        self, inp: GenerateInput, control: JobControl, previews: PreviewPublisher | None
    ) -> PipelineCall:
        check_pixels(inp.width, inp.height, self.ctx.settings.max_output_pixels)
        self._fetch_adapters(inp.adapters)
        return GenerateJob(inp, control, previews)

    def _inpaint(
        self, inp: InpaintInput, control: JobControl, previews: PreviewPublisher | None
    ) -> PipelineCall:
        (image, mask), ingredient = self._load(image=inp.image, mask=inp.mask)
        # The checks run_inpaint makes, made here so that bad input never waits for the GPU.
        fit_mask(mask, image.size, self._output_size(image))
        check_strength(inp.steps, inp.strength)
        self._fetch_adapters(inp.adapters)
        control.check()
        return AloneCall(
            lambda: self.predictor.run_inpaint(inp, image, mask, control, previews),
            inp.num_images,
            ingredient,
        )

    def _style(
        self, inp: StyleInput, control: JobControl, previews: PreviewPublisher | None
    ) -> PipelineCall:
        if inp.style_image is not None and not self.predictor.has_ip_adapter:
            raise InvalidInput(NO_IP_ADAPTER)
        if inp.style_image is None:
            ((image,), ingredient), style = self._load(image=inp.image), None
        else:
            (image, style), ingredient = self._load(image=inp.image, style_image=inp.style_image)
        self._output_size(image)
        check_strength(inp.steps, inp.strength)
        self._fetch_adapters(inp.adapters)
        control.check()
        return AloneCall(
            lambda: self.predictor.run_style(inp, image, style, control, previews),
            inp.num_images,
            ingredient,
        )

    def _output_size(self, image: Image.Image) -> tuple[int, int]:
        width, height = image.size
        return fit_size(width, height, self.ctx.settings.max_output_pixels)

    def _load(self, **refs: str) -> tuple[list[Image.Image], Ingredient | None]:
        """The job's images by input field, within its pixel budget (IMAGEQ_MAX_JOB_PIXELS),
        and the first one (``image``) as the outputs' C2PA ingredient when signing.

        Decoded at full size: the output size follows the input image's.
        """
        named = [Named(field, ref) for field, ref in refs.items()]
        blobs = fetch_all(named, self.ctx.settings, self.ctx.storage)
        images = []
        for item, data in zip(named, blobs, strict=True):
            try:
                images.append(decode_image(data, self.ctx.settings))
            except ImageqError as exc:
                raise field_error(item.field, exc) from None
        ingredient = None if self.signer is None else _ingredient(blobs[0], images[0])
        return images, ingredient

    def _fetch_adapters(self, refs: list[AdapterRef]) -> None:
        """Download the adapters (registry fields, ``_owned_adapters``) now: the pipeline
        thread then finds them in the local cache."""
        for ref in refs:
            self.registry.local_dir(ref.name)

    def _png(self, image: GeneratedImage, name: str, ingredient: Ingredient | None) -> bytes:
        """The output's PNG, signed when the deployment has a certificate: on the job's
        thread, like the encoding (docs/design.md "Provenance")."""
        png = image.png()
        if self.signer is None:
            return png
        model = str(image.parameters.get("model", ""))
        adapters = [str(a["name"]) for a in image.parameters.get("adapters", [])]
        claim = Claim(image.origin, model, adapters, image.parameters, ingredient, name)
        return self.signer.sign(png, claim)

    def _output(
        self,
        job_id: str,
        images: list[GeneratedImage],
        asked: list[AdapterRef],
        ingredient: Ingredient | None = None,
    ) -> dict[str, Any]:
        entries = []
        for index, image in enumerate(images):
            name = f"image-{index}.png"
            png = self._png(image, name, ingredient)
            ref = self.ctx.put_output(job_id, name, png, "image/png")
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
        if "adapters" in parameters:
            # The names the job gave, not the registry fields they resolved to.
            parameters["adapters"] = [{"name": a.name, "scale": a.scale} for a in asked]
        return {
            "images": entries,
            "seeds": [image.seed for image in images],
            "parameters": parameters,
        }


def _ingredient(data: bytes, image: Image.Image) -> Ingredient:
    """The input as c2pa reads it: its own bytes, or a PNG of its pixels for a format c2pa
    cannot read (BMP)."""
    fmt = sniff_format(data)
    if fmt is not None and fmt != "BMP":
        return Ingredient(data, IMAGE_TYPES[fmt][0])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Ingredient(buffer.getvalue(), "image/png")


def _signer(settings: Settings) -> ProvenanceSigner | None:
    signer = ProvenanceSigner.from_settings(settings)
    if signer is None:
        log.warning(UNSIGNED_WARNING)
    return signer


def _registry(ctx: WorkerContext) -> tuple[AdapterRegistry, Callable[[], None]]:
    configured = ctx.settings.adapter_cache_dir
    if configured:
        return AdapterRegistry(ctx.store, ctx.storage, Path(configured)), lambda: None
    cache = Path(tempfile.mkdtemp(prefix="imageq-adapters-"))
    registry = AdapterRegistry(ctx.store, ctx.storage, cache)
    return registry, lambda: shutil.rmtree(cache, ignore_errors=True)


def _build(ctx: WorkerContext, device: str, inpaint_only: bool) -> Built:
    settings = ctx.settings
    signer = _signer(settings)  # before the model loads: a bad certificate fails fast
    registry, remove_cache = _registry(ctx)
    predictor = DiffusionPredictor(
        settings.model_inpaint if inpaint_only else settings.model_diffusion,
        settings=settings,
        inpaint_only=inpaint_only,
        # Fields are resolved per job, so an adapter published now serves the next job.
        adapter_path=registry.local_dir,
        max_loaded_adapters=settings.max_loaded_adapters,
    )
    try:
        predictor.setup(device)
        # A bad IMAGEQ_PREVIEW_DECODER stops the worker at start, not its jobs later.
        decoder = open_decoder(settings.preview_decoder) if settings.previews else None
    except BaseException:
        remove_cache()
        raise
    batcher = pipeline_batcher(
        predictor, settings.max_diffusion_batch_images, settings.max_batch_wait_ms
    )
    # Previews decode and store on two threads of their own (one preview a job in flight):
    # never on the pipeline's thread, and not on a job's, which waits in batcher.run.
    executor = ThreadPoolExecutor(2, thread_name_prefix="imageq-preview") if decoder else None
    batcher.start()
    handler = DiffusionHandler(ctx, predictor, batcher, registry, signer, decoder, executor)
    kinds = ("inpaint",) if inpaint_only else ("generate", "inpaint", "style")
    stops: list[Callable[[], None]] = [batcher.stop, remove_cache]
    if executor is not None:
        stops.append(lambda: executor.shutdown(wait=False, cancel_futures=True))
    return {kind: handler for kind in kinds}, stops


def build(ctx: WorkerContext, device: str) -> Built:
    """The diffusion worker: one warm SD pipeline (IMAGEQ_MODEL_DIFFUSION) for all three."""
    return _build(ctx, device, inpaint_only=False)


def build_inpaint(ctx: WorkerContext, device: str) -> Built:
    """The inpaint worker: a dedicated inpainting checkpoint (IMAGEQ_MODEL_INPAINT)."""
    return _build(ctx, device, inpaint_only=True)
