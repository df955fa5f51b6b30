"""Stable Diffusion: generate, inpaint and style (img2img + IP-Adapter) from one warm pipeline.

One ``StableDiffusionPipeline`` is loaded; the img2img and inpaint pipelines are built
from it with ``from_pipe`` and share its modules, so the worker holds one copy of the
weights. An inpainting worker (``inpaint_only=True``) loads a dedicated inpainting
checkpoint (9-channel UNet) instead and serves inpaint alone.

Reproducibility: image ``i`` of a job uses seed ``seed + i`` (mod 2**32) with its own CPU
``torch.Generator``, so a seed gives the same PNG bytes on the same hardware whatever
else runs, and a job batched with others draws exactly the noise it would alone. Its
pixels then match as far as the kernels are batch-invariant, which they only nearly are:
on CPU, GEMMs change below 4 rows and convolutions with the batch's size and a sample's
place in it, so a batched image can differ from the lone one by a level in a few pixels
(deterministically, for a given batch layout). The VAE decodes one image at a time, so
decoding at least is batch-invariant.
"""

from __future__ import annotations

import secrets
from collections.abc import Hashable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from PIL import Image

from imageq.api_client.errors import ImageqError, InvalidInput, ModelError, OutOfMemory
from imageq.api_client.inputs import GenerateInput, InpaintInput, StyleInput
from imageq.api_client.settings import Settings
from imageq.workers.predictors.adapters import (
    AdapterResolver,
    IpAdapterSwitch,
    LoraAdapters,
    job_scheduler,
    sampler_name,
)
from imageq.workers.predictors.base import BatchedPredictor, BatchInterrupted, StepCallback
from imageq.workers.predictors.diffusion_png import (
    GeneratedImage,
    check_pixels,
    check_strength,
    display_name,
    fit_mask,
    fit_size,
    paste_unmasked,
    resized,
)
from imageq.workers.predictors.previews import CallPreviews, PreviewSink, offer_previews
from imageq.workers.provenance.claims import Origin

SEED_RANGE = 2**32
NO_IP_ADAPTER = "style_image: this worker has no IP-Adapter (set IMAGEQ_IP_ADAPTER)"


@dataclass(frozen=True)
class GenerateJob:
    """One generate job as ``predict`` takes it: its input, its step callback and
    where its step previews go (None: none)."""

    inp: GenerateInput
    on_step: StepCallback
    previews: PreviewSink | None = None


class _CallbackRaised(Exception):
    # Carries an exception out of diffusers untouched, past the ModelError conversion.
    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class DiffusionPredictor(BatchedPredictor[GenerateJob, list[GeneratedImage]]):
    """One warm Stable Diffusion pipeline serving generate, inpaint and style jobs.

    Not thread-safe: a worker runs one pipeline call at a time (generate jobs may share
    a call through ``predict``; inpaint and style run alone).
    """

    def __init__(
        self,
        model_id: str,
        *,
        settings: Settings,
        inpaint_only: bool = False,
        adapter_path: AdapterResolver | None = None,
        max_loaded_adapters: int = 4,
        warm_up: bool = True,
    ) -> None:
        self.model_id = model_id
        self.settings = settings
        self.inpaint_only = inpaint_only
        self.device = "cpu"
        self._adapter_path = adapter_path
        self._max_loaded_adapters = max_loaded_adapters
        self._warm_up = warm_up
        self._pipe: Any = None
        self._img2img: Any = None
        self._inpaint: Any = None
        self._ip: IpAdapterSwitch | None = None
        self._loras: LoraAdapters | None = None
        self._scheduler_config: Any = None
        self._scheduler_class = ""

    # -- setup -------------------------------------------------------------------------

    def setup(self, device: str = "auto") -> None:
        """Load the pipeline(s) onto ``device`` once and warm up; ``ModelError`` on failure."""
        import torch
        from diffusers import (
            AutoPipelineForImage2Image,
            AutoPipelineForInpainting,
            StableDiffusionInpaintPipeline,
            StableDiffusionPipeline,
        )

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        half = device.startswith("cuda") and self.settings.half_precision
        kwargs: dict[str, Any] = {
            "dtype": torch.float16 if half else torch.float32,
            "use_safetensors": True,
        }
        if not self.settings.safety_checker:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        try:
            cls = StableDiffusionInpaintPipeline if self.inpaint_only else StableDiffusionPipeline
            pipe = cls.from_pretrained(self.model_id, **kwargs).to(device)
            # One image per VAE call: less peak memory, and batch-invariant decoding.
            pipe.vae.enable_slicing()
            if self.inpaint_only:
                self._inpaint = pipe
            else:
                self._img2img = AutoPipelineForImage2Image.from_pipe(pipe)
                self._inpaint = AutoPipelineForInpainting.from_pipe(pipe)
                if self.settings.ip_adapter:
                    self._ip = IpAdapterSwitch.load(self._img2img, self.settings.ip_adapter)
            for p in (pipe, self._img2img, self._inpaint):
                if p is not None:
                    p.set_progress_bar_config(disable=True)
            self._pipe = pipe
            self._scheduler_config = pipe.scheduler.config
            self._scheduler_class = type(pipe.scheduler).__name__
            self._loras = LoraAdapters(pipe, self._adapter_path, self._max_loaded_adapters)
            if self._warm_up:
                self._run_warm_up()
        except ImageqError:
            raise
        except Exception as exc:
            raise ModelError(f"cannot load {self.model_id!r} on {device}: {exc}") from exc

    def _run_warm_up(self) -> None:
        import torch

        side = 8 * int(self._pipe.vae_scale_factor)
        generator = torch.Generator(device="cpu").manual_seed(0)
        args: dict[str, Any] = {"height": side, "width": side, "generator": [generator]}
        if self.inpaint_only:
            args.update(
                image=Image.new("RGB", (side, side)), mask_image=Image.new("L", (side, side))
            )
        self._pipe(prompt=["warm up"], num_inference_steps=1, **args)

    @property
    def has_ip_adapter(self) -> bool:
        return self._ip is not None

    @property
    def loaded_adapters(self) -> list[str]:
        """Registry names of the LoRA adapters held in memory, least recently used first."""
        return self._loras.loaded if self._loras is not None else []

    # -- generate ----------------------------------------------------------------------

    def batch_key(self, item: GenerateJob) -> Hashable:
        """Generate jobs with equal keys can share one pipeline call."""
        inp = item.inp
        adapters = tuple(sorted((a.name, a.scale) for a in inp.adapters))
        return (inp.width, inp.height, inp.steps, inp.scheduler, inp.guidance_scale, adapters)

    def predict(self, batch: Sequence[GenerateJob]) -> list[list[GeneratedImage]]:
        """Generate jobs of equal ``batch_key`` in one pipeline call, each getting its
        own images.

        With several jobs, a step callback that raises stops the whole call with
        ``BatchInterrupted`` naming the job (run the others again); a lone job's
        callback error propagates unchanged.
        """
        if not batch:
            return []
        if len({self.batch_key(job) for job in batch}) > 1:
            raise ValueError("jobs in one batch must have equal batch_key()")
        inps = [job.inp for job in batch]
        on_steps = [job.on_step for job in batch]
        sinks = [job.previews for job in batch]
        return self._generate(inps, on_steps, sinks, batched=len(batch) > 1)

    def run_generate(self, inp: GenerateInput, on_step: StepCallback) -> list[GeneratedImage]:
        """One generate job; whatever ``on_step`` raises propagates unchanged."""
        return self.predict([GenerateJob(inp, on_step)])[0]

    def _generate(
        self,
        inps: Sequence[GenerateInput],
        on_steps: Sequence[StepCallback],
        sinks: Sequence[PreviewSink | None],
        batched: bool,
    ) -> list[list[GeneratedImage]]:
        self._require_full_pipeline()
        first = inps[0]
        check_pixels(first.width, first.height, self.settings.max_output_pixels)
        seeds = [self._seeds(inp.seed, inp.num_images) for inp in inps]
        args = _text_args(inps, [inp.prompt for inp in inps])
        args.update(height=first.height, width=first.width)
        flat = [seed for job in seeds for seed in job]
        previews = CallPreviews([inp.num_images for inp in inps], sinks)
        images = self._call(self._pipe, first, flat, args, on_steps, batched, previews)
        results = []
        for inp, job_seeds in zip(inps, seeds, strict=True):
            results.append(self._outputs(inp, job_seeds, images[: inp.num_images], {}))
            images = images[inp.num_images :]
        return results

    # -- inpaint and style ------------------------------------------------------------

    def run_inpaint(
        self,
        inp: InpaintInput,
        image: Image.Image,
        mask: Image.Image,
        on_step: StepCallback,
        previews: PreviewSink | None = None,
    ) -> list[GeneratedImage]:
        """Repaint the white part of ``mask``; the output size is ``fit_size(image.size)``."""
        size = fit_size(*image.size, self.settings.max_output_pixels)
        mask = fit_mask(mask, image.size, size)
        check_strength(inp.steps, inp.strength)
        seeds = self._seeds(inp.seed, inp.num_images)
        # One copy per image: the pipeline then encodes image i with generator i, so
        # image i depends on its own seed alone.
        args = _text_args([inp], [inp.prompt])
        args.update(
            image=[resized(image, size)] * inp.num_images,
            mask_image=[mask] * inp.num_images,
            width=size[0],
            height=size[1],
            strength=inp.strength,
        )
        sinks = CallPreviews([inp.num_images], [previews])
        images = self._call(self._inpaint, inp, seeds, args, [on_step], False, sinks)
        if inp.keep_unmasked:
            images = paste_unmasked(images, args["image"][0], mask)
        return self._outputs(inp, seeds, images, {"strength": inp.strength}, Origin.EDITED)

    def run_style(
        self,
        inp: StyleInput,
        image: Image.Image,
        style_image: Image.Image | None,
        on_step: StepCallback,
        previews: PreviewSink | None = None,
    ) -> list[GeneratedImage]:
        """Img2img of ``image`` towards ``style_prompt`` (else ``prompt``), the adapters,
        and ``style_image`` through the IP-Adapter at ``style_scale``."""
        self._require_full_pipeline()
        if style_image is not None and self._ip is None:
            raise InvalidInput(NO_IP_ADAPTER)
        size = fit_size(*image.size, self.settings.max_output_pixels)
        check_strength(inp.steps, inp.strength)
        seeds = self._seeds(inp.seed, inp.num_images)
        prompt = inp.style_prompt or inp.prompt
        args = _text_args([inp], [prompt])
        args.update(image=resized(image, size), strength=inp.strength)
        extra: dict[str, Any] = {"prompt": prompt, "strength": inp.strength}
        ip: AbstractContextManager[None] = nullcontext()
        if style_image is not None and self._ip is not None:
            args["ip_adapter_image"] = style_image.convert("RGB")
            extra["style_scale"] = inp.style_scale
            ip = self._ip.active(self._img2img, inp.style_scale)
        with ip:
            sinks = CallPreviews([inp.num_images], [previews])
            images = self._call(self._img2img, inp, seeds, args, [on_step], False, sinks)
        return self._outputs(inp, seeds, images, extra, Origin.EDITED)

    # -- shared machinery -------------------------------------------------------------

    def _seeds(self, seed: int | None, count: int) -> list[int]:
        if seed is None:
            seed = secrets.randbelow(SEED_RANGE)
        return [(seed + i) % SEED_RANGE for i in range(count)]

    def _require_full_pipeline(self) -> None:
        if self.inpaint_only:
            raise ModelError("this worker holds an inpainting checkpoint: it serves inpaint only")

    @contextmanager
    def _job(self, pipe: Any, inp: Any) -> Iterator[None]:
        """Per-job state (scheduler, LoRA) set up and always undone; errors mapped."""
        import torch

        if pipe is None or self._loras is None:
            raise ModelError("the pipeline is not loaded: call setup() first")
        shared_scheduler = pipe.scheduler
        try:
            # Swapped on this pipeline object only, and restored below.
            pipe.scheduler = job_scheduler(
                inp.scheduler, self._scheduler_class, self._scheduler_config
            )
            with self._loras.applied(inp.adapters):
                yield
        except _CallbackRaised as raised:
            raise raised.error from None
        except (ImageqError, BatchInterrupted):
            raise
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise OutOfMemory(f"the GPU ran out of memory: {exc}") from None
        except MemoryError:
            raise OutOfMemory("the host ran out of memory") from None
        except Exception as exc:
            raise ModelError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            pipe.scheduler = shared_scheduler

    def _call(
        self,
        pipe: Any,
        inp: Any,
        seeds: list[int],
        args: dict[str, Any],
        on_steps: Sequence[StepCallback],
        batched: bool,
        previews: CallPreviews,
    ) -> list[tuple[Image.Image, bool]]:
        import torch

        def on_step_end(
            pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            total = int(pipeline.num_timesteps)
            for index, on_step in enumerate(on_steps):
                try:
                    on_step(step + 1, total, {"stage": "denoising"})
                except Exception as exc:
                    error = BatchInterrupted(index, exc) if batched else exc
                    raise _CallbackRaised(error) from exc
            if previews.wanted and "latents" in tensors:
                offer_previews(tensors["latents"], previews.counts, previews.sinks, step + 1, total)
            return tensors

        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        with self._job(pipe, inp), torch.inference_mode():
            out = pipe(
                **args,
                num_images_per_prompt=1,
                generator=generators,
                output_type="pil",
                callback_on_step_end=on_step_end,
            )
        flags = out.nsfw_content_detected or [False] * len(out.images)
        return [(im, bool(flag)) for im, flag in zip(out.images, flags, strict=True)]

    def _outputs(
        self,
        inp: Any,
        seeds: list[int],
        images: list[tuple[Image.Image, bool]],
        extra: dict[str, Any],
        origin: Origin = Origin.CREATED,
    ) -> list[GeneratedImage]:
        results = []
        for seed, (image, nsfw) in zip(seeds, images, strict=True):
            params: dict[str, Any] = {
                "prompt": inp.prompt,
                "negative_prompt": inp.negative_prompt,
                "steps": inp.steps,
                "scheduler": inp.scheduler,
                "sampler": sampler_name(inp.scheduler, self._scheduler_class),
                "guidance_scale": inp.guidance_scale,
                "seed": seed,
                "width": image.width,
                "height": image.height,
                "model": display_name(self.model_id),
                "adapters": [{"name": a.name, "scale": a.scale} for a in inp.adapters],
                **extra,
            }
            results.append(GeneratedImage(image, seed, params, nsfw, origin))
        return results


def _text_args(inps: Sequence[Any], prompts: list[str]) -> dict[str, Any]:
    # Prompts expanded per image (never num_images_per_prompt), so that the same flat
    # lists serve one job or a batch of jobs, one generator per image.
    return {
        "prompt": [p for inp, p in zip(inps, prompts, strict=True) for _ in range(inp.num_images)],
        "negative_prompt": [inp.negative_prompt for inp in inps for _ in range(inp.num_images)],
        "num_inference_steps": inps[0].steps,
        "guidance_scale": inps[0].guidance_scale,
    }
