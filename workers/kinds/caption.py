"""Caption jobs: fetch the images, run them through the micro-batcher, shape the output."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from imageq.api_client.adapters import adapter_field, entry_tenant
from imageq.api_client.errors import InvalidInput
from imageq.api_client.inputs import CaptionInput, GenerationOptions, Resize
from imageq.api_client.languages import BASE_LANGUAGE, best_matches, match_rank, primary
from imageq.api_client.schemas import JobDocument
from imageq.api_client.settings import Settings
from imageq.workers.io.adapter_registry import AdapterRegistry, revision_of
from imageq.workers.io.job_images import decode_side, load_job_images
from imageq.workers.ops.devices import SpeedOptions
from imageq.workers.predictors.adapters import peft_adapter_name
from imageq.workers.predictors.attention import OVERLAY_MAX_SIDE
from imageq.workers.predictors.blip import DEFAULT_INPUT_SIDE
from imageq.workers.predictors.caption import CaptionItem, CaptionPredictor, CaptionResult
from imageq.workers.predictors.framing import Frame
from imageq.workers.runtime.autobatch import RunBatch, for_worker
from imageq.workers.runtime.batching import Batcher
from imageq.workers.runtime.control import JobControl
from imageq.workers.runtime.lifecycle import Built, WorkerContext

# Stands in for an image once the model's input tensor is made from it and nothing else
# reads it (no attention overlay): a 512-image job keeps no decoded image beside its
# tensors. Never drawn on or changed; the predictors read ``pixels`` instead.
PREPROCESSED = Image.new("RGB", (1, 1))


class CaptionAdapters:
    """Loads registry adapters into the warm predictor: on first use, and again when the
    registry holds a newer version (a re-published name), so no restart is needed."""

    def __init__(self, registry: AdapterRegistry, predictor: CaptionPredictor) -> None:
        self.registry = registry
        self.predictor = predictor
        self._versions: dict[str, str] = {}
        self._lock = threading.Lock()

    def for_language(self, language: str, tenant: str | None = None) -> str | None:
        """The newest caption adapter for ``language`` (RFC 4647 matching: the exact tag,
        else a shorter one, else a more specific one) that a job of ``tenant`` may use:
        its own first, then the shared ones; None: the base model writes it."""
        entry = self.entry_for_language(language, tenant)
        return None if entry is None else str(entry["name"])

    def entry_for_language(self, language: str, tenant: str | None = None) -> dict[str, Any] | None:
        """``for_language``'s registry entry."""
        entries = self.registry.entries(tenant)
        own = [e for e in entries if tenant is not None and entry_tenant(e) == tenant]
        shared = [e for e in entries if entry_tenant(e) is None]
        offered_any: set[str] = set()
        # Another tenant's adapters are never in ``entries``: they are not offered at all.
        for group in (own, shared):
            offered: dict[str, list[dict[str, Any]]] = {}
            for entry in group:
                if entry.get("target", "caption") == "caption" and entry.get("language"):
                    offered.setdefault(str(entry["language"]), []).append(entry)
            offered_any.update(offered)
            best = best_matches(language, offered)
            if best:
                candidates = [e for tag in best for e in offered[tag]]
                return max(candidates, key=lambda e: (str(e.get("version", "")), str(e["name"])))
        if primary(language) == BASE_LANGUAGE:
            return None
        available = ", ".join(sorted(offered_any)) or "none"
        raise InvalidInput(
            f"input.language: no caption adapter writes {language!r}; languages available: "
            f"{available} (and {BASE_LANGUAGE!r}, the base model's)"
        )

    def check_language(
        self, name: str, language: str, tenant: str | None = None
    ) -> dict[str, Any] | None:
        """Refuse a job naming both an adapter and a language that adapter does not write;
        returns the adapter's registry entry."""
        entry = self.registry.get(name, tenant)
        if entry is None:
            raise InvalidInput(f"input.adapter: no adapter named {name!r} in the registry")
        written = entry.get("language")
        if not written or match_rank(language, str(written)) is None:
            raise InvalidInput(
                f"input.language: adapter {name!r} writes {written or 'no declared language'}, "
                f"not {language!r}"
            )
        return entry

    def ensure(
        self, name: str, entry: dict[str, Any] | None = None, tenant: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Load ``name`` as a job of ``tenant`` means it (its own, else the shared one) if
        needed; returns the name the predictor knows it by, and its registry entry
        (``entry``: already read for this job, so not read again)."""
        entry = entry if entry is not None else self.registry.get(name, tenant)
        if entry is None:
            raise InvalidInput(f"input.adapter: no adapter named {name!r} in the registry")
        target = entry.get("target", "caption")
        if target != "caption":
            raise InvalidInput(f"input.adapter: {name!r} is a {target} adapter, not a caption one")
        # Owner and name: two tenants' adapters of one name are two adapters.
        field = adapter_field(str(entry["name"]), entry_tenant(entry))
        revision = revision_of(entry)
        # Registry names may hold "." and "-", which peft cannot use in module keys.
        loaded = peft_adapter_name(field)
        with self._lock:
            if self._versions.get(field) == revision and loaded in self.predictor.adapters:
                return loaded, entry
            # load_adapter waits for a running batch and replaces an older version; the
            # folder holds exactly the revision read above, or a newer one if it changed
            # meanwhile (never a mix: see AdapterRegistry.local_dir).
            self.predictor.load_adapter(loaded, self.registry.local_dir(field))
            self._versions[field] = revision
        return loaded, entry


CaptionBatcher = Batcher[CaptionItem, CaptionResult]
#: One image and its ``resize`` to the vision encoder's input tensor and where the image
#: lies on it (``BlipPredictor.prepare``).
Prepare = Callable[[Image.Image, Resize | None], tuple[Any, Frame]]


class CaptionHandler:
    def __init__(
        self,
        ctx: WorkerContext,
        batcher: CaptionBatcher,
        adapters: CaptionAdapters | None = None,
        prepare: Prepare | None = None,
        input_side: int = DEFAULT_INPUT_SIDE,
    ) -> None:
        self.ctx = ctx
        self.batcher = batcher
        self.adapters = adapters
        # On this job's thread, not the batcher's (BlipPredictor.preprocess says why).
        self.prepare = prepare
        self.input_side = input_side

    def handle(self, job: JobDocument, inp: CaptionInput, control: JobControl) -> dict[str, Any]:
        name, entry = self._adapter(inp, job.tenant)
        adapter = None
        if name is not None and self.adapters is not None:
            # Before joining a batch: a download must not hold a forming batch open.
            adapter, entry = self.adapters.ensure(name, entry, job.tenant)
        with self.batcher.incoming() as ticket:
            # Overlays keep the input's size up to OVERLAY_MAX_SIDE: decoded that large.
            side = decode_side(self.input_side)
            side = max(side, OVERLAY_MAX_SIDE) if inp.attention else side
            images = load_job_images(inp.images, self.ctx.settings, self.ctx.storage, side)
            control.check()
            # One decoded image at a time: each leaves only its tensor (and, for an
            # overlay, a copy no larger than the overlay) before the next is decoded.
            items = [self._item(image, inp, adapter) for image in images]
            ran = self.batcher.run(
                items,
                control.check,
                ticket,
                control.images_progress("captioning", len(items)),
                charge=control.charge_model,
            )
        control.metrics["batch_size"] = max(r.batch_size for r in ran)
        control.metrics["images"] = len(items)
        captions = [
            self._caption(job.id, i, item.image, r.result, inp)
            for i, (item, r) in enumerate(zip(items, ran, strict=True))
        ]
        out: dict[str, Any] = {"captions": captions}
        if name is not None:
            out["adapter"] = name
            if language := (entry or {}).get("language"):
                out["language"] = language
        return out

    def _item(self, image: Image.Image, inp: CaptionInput, adapter: str | None) -> CaptionItem:
        """The batch item of one decoded image, holding only what the job still needs."""
        pixels, frame = (None, None) if self.prepare is None else self.prepare(image, inp.resize)
        if inp.attention:
            # The overlay's panels are at most OVERLAY_MAX_SIDE: a copy that size draws
            # the same panels (to a pixel of rounding) as the decoded image.
            image.thumbnail((OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE))
        elif pixels is not None:
            image = PREPROCESSED
        return CaptionItem(
            image=image,
            prompt=inp.prompt,
            generation=inp.generation,
            adapter=adapter,
            attention=inp.attention,
            pixels=pixels,
            resize=inp.resize,
            frame=frame,
        )

    def _adapter(
        self, inp: CaptionInput, tenant: str | None
    ) -> tuple[str | None, dict[str, Any] | None]:
        """The registry adapter the job (of ``tenant``) asks for, by name or by language
        (None: none), and its registry entry when finding it read one."""
        if inp.adapter is None and inp.language is None:
            return None, None
        if self.adapters is None:
            field = "adapter" if inp.adapter is not None else "language"
            raise InvalidInput(f"input.{field}: this worker has no adapter registry")
        if inp.adapter is None:
            entry = self.adapters.entry_for_language(str(inp.language), tenant)
            return (None, None) if entry is None else (str(entry["name"]), entry)
        if inp.language is not None:
            return inp.adapter, self.adapters.check_language(inp.adapter, inp.language, tenant)
        return inp.adapter, None

    def _caption(
        self, job_id: str, index: int, image: Any, result: CaptionResult, inp: CaptionInput
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {"index": index}
        if inp.generation.num_return_sequences > 1:
            entry["texts"] = result.texts
        else:
            entry["text"] = result.texts[0]
        if inp.attention and result.attentions:
            # The best sequence's files keep their names; sequence s > 0 adds "-s".
            stems = [str(index)] + [f"{index}-{s}" for s in range(1, len(result.attentions))]
            maps = [
                self._attention(job_id, stem, image, payload)
                for stem, payload in zip(stems, result.attentions, strict=True)
            ]
            entry["attention"] = maps[0]
            if inp.generation.num_return_sequences > 1:
                entry["attentions"] = maps
        return entry

    def _attention(
        self, job_id: str, stem: str, image: Any, payload: dict[str, Any]
    ) -> dict[str, Any]:
        """Store the grids (JSON) and the overlay (PNG) as ``attention-{stem}``; return
        refs and a small summary.

        See docs/match-and-attention.md for both files and the summary's fields.
        """
        from imageq.workers.predictors.attention import (
            OVERLAY_MAX_PIXELS,
            OVERLAY_MAX_SIDE,
            overlay_png,
            panel_size,
            peak_cell,
        )

        put = self.ctx.put_output
        tokens = payload.get("tokens") or []
        data = json.dumps(payload, separators=(",", ":")).encode()
        grid_ref = put(job_id, f"attention-{stem}.json", data, "application/json")
        # Panels keep the input's size; only a huge photo or a long caption shrinks them.
        limits = {"max_side": OVERLAY_MAX_SIDE, "max_pixels": OVERLAY_MAX_PIXELS}
        width, height = panel_size(image.size, len(tokens), **limits)
        overlay_ref = put(
            job_id, f"attention-{stem}.png", overlay_png(image, payload, **limits), "image/png"
        )
        # The grids stay in storage: inlined, 512 images x 30 tokens x 576 cells would put
        # tens of megabytes into the record and every webhook. The peak cell says where
        # each token looked at a glance.
        summary = [{"token": t["token"], "peak": peak_cell(t["mean"])} for t in tokens]
        return {
            "grid": payload.get("grid"),
            "frame": payload.get("frame"),
            "layers": len(tokens[0]["layers"]) if tokens else 0,
            "tokens": summary,
            "json": grid_ref,
            "overlay": overlay_ref,
            "panel": [width, height],
        }


def caption_probe(predictor: CaptionPredictor, settings: Settings) -> RunBatch:
    """Synthetic batches to measure the batch size with: preprocessed as job threads hand
    them over, captions of a fixed length (``IMAGEQ_BATCH_TUNING_TOKENS``)."""
    image = Image.new("RGB", (640, 480), (90, 120, 150))
    pixels = predictor.preprocess(image)
    tokens = settings.batch_tuning_tokens
    options = GenerationOptions(max_new_tokens=tokens, min_new_tokens=tokens)

    def run(n: int) -> None:
        predictor.predict([CaptionItem(image, None, options, pixels=pixels) for _ in range(n)])

    return run


def build(ctx: WorkerContext, device: str) -> Built:
    """The caption worker: one warm BLIP behind a micro-batcher."""
    settings = ctx.settings
    predictor = CaptionPredictor(settings.model_caption, speed=SpeedOptions.from_settings(settings))
    predictor.setup(device)
    if settings.adapter_cache_dir:
        cache, owned = Path(settings.adapter_cache_dir), False
    else:
        cache, owned = Path(tempfile.mkdtemp(prefix="imageq-caption-adapters-")), True
    adapters = CaptionAdapters(AdapterRegistry(ctx.store, ctx.storage, cache), predictor)
    max_batch, autobatch = for_worker(settings, device, caption_probe(predictor, settings))
    batcher = CaptionBatcher(
        predictor, max_batch=max_batch, max_wait_ms=settings.max_batch_wait_ms, autobatch=autobatch
    )
    batcher.start()

    def remove_cache() -> None:
        if owned:
            shutil.rmtree(cache, ignore_errors=True)

    handler = CaptionHandler(
        ctx, batcher, adapters, prepare=predictor.prepare, input_side=predictor.input_side
    )
    return {"caption": handler}, [batcher.stop, remove_cache]
