"""Caption jobs: fetch the images, run them through the micro-batcher, shape the output."""

from __future__ import annotations

import json
from typing import Any

from api_client.errors import ImageqError
from api_client.schemas import CaptionInput, JobDocument
from workers.batching import Batcher, Ticket
from workers.control import JobControl
from workers.images import load_image
from workers.lifecycle import Built, WorkerContext
from workers.predictors.caption import CaptionItem, CaptionResult


def load_images(refs: list[str], ctx: WorkerContext) -> list[Any]:
    """Load every image; an error names the image (``input.images[3]``) it came from."""
    images = []
    for i, ref in enumerate(refs):
        try:
            images.append(load_image(ref, ctx.settings, ctx.storage))
        except ImageqError as exc:
            raise type(exc)(f"input.images[{i}]: {exc.message}") from None
    return images


class CaptionHandler:
    def __init__(self, ctx: WorkerContext, batcher: Batcher) -> None:
        self.ctx = ctx
        self.batcher = batcher

    def handle(self, job: JobDocument, inp: CaptionInput, control: JobControl) -> dict[str, Any]:
        with self.batcher.incoming() as ticket:
            return self._handle(job, inp, control, ticket)

    def _handle(
        self, job: JobDocument, inp: CaptionInput, control: JobControl, ticket: Ticket
    ) -> dict[str, Any]:
        images = load_images(inp.images, self.ctx)
        control.check()
        items = [
            CaptionItem(
                image=image,
                prompt=inp.prompt,
                generation=inp.generation,
                adapter=inp.adapter,
                attention=inp.attention,
            )
            for image in images
        ]
        results, batch_size = self.batcher.run(items, control.is_canceled, ticket)
        control.metrics["batch_size"] = batch_size
        control.metrics["images"] = len(items)
        captions = [
            self._caption(job.id, i, image, result, inp)
            for i, (image, result) in enumerate(zip(images, results, strict=True))
        ]
        return {"captions": captions}

    def _caption(
        self, job_id: str, index: int, image: Any, result: CaptionResult, inp: CaptionInput
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {"index": index}
        if inp.generation.num_return_sequences > 1:
            entry["texts"] = result.texts
        else:
            entry["text"] = result.texts[0]
        if inp.attention and result.attention is not None:
            entry["attention"] = self._attention(job_id, index, image, result.attention)
        return entry

    def _attention(
        self, job_id: str, index: int, image: Any, payload: dict[str, Any]
    ) -> dict[str, Any]:
        from workers.predictors.caption import overlay_png

        put = self.ctx.put_output
        grid_ref = put(
            job_id, f"attention-{index}.json", json.dumps(payload).encode(), "application/json"
        )
        overlay = overlay_png(image, payload)
        overlay_ref = put(job_id, f"attention-{index}.png", overlay, "image/png")
        # The per-token mean grids are small enough to inline; per-layer grids stay in storage.
        mean = [{"token": t["token"], "grid": t["mean"]} for t in payload.get("tokens", [])]
        return {
            "grid": payload.get("grid"),
            "tokens": mean,
            "json": grid_ref,
            "overlay": overlay_ref,
        }


def build(ctx: WorkerContext, device: str) -> Built:
    """The caption worker: one warm BLIP behind a micro-batcher."""
    from workers.predictors.caption import CaptionPredictor

    settings = ctx.settings
    predictor = CaptionPredictor(settings.model_caption, half_precision=settings.half_precision)
    predictor.setup(device)
    batcher = Batcher(predictor, settings.max_batch_images, settings.max_batch_wait_ms)
    batcher.start()
    return {"caption": CaptionHandler(ctx, batcher)}, [batcher.stop]
