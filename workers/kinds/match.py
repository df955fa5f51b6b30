"""Match jobs: every image against every text, ITM probability and ITC cosine.

The output document (see docs/match-and-attention.md)::

    {"texts": [...],                       # the job's texts, in order
     "scores": [{"index": i,               # one entry per image, in order
                 "itm": [p_0, ...],        # per text, in [0, 1]
                 "cosine": [c_0, ...],     # per text, in [-1, 1]
                 "best": {"text_index": j, "text": "...", "itm": p_j, "cosine": c_j}}],
     "truncated": [j, ...],                # texts cut to the model's token limit
     "max_text_tokens": n}
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from imageq.api_client.errors import InvalidInput
from imageq.api_client.inputs import MatchInput
from imageq.api_client.schemas import JobDocument
from imageq.workers.io.job_images import decode_side, load_job_images
from imageq.workers.kinds.caption import PREPROCESSED
from imageq.workers.ops.devices import SpeedOptions
from imageq.workers.predictors.match import MatchItem, MatchPredictor, MatchResult
from imageq.workers.runtime.autobatch import RunBatch, for_worker
from imageq.workers.runtime.batching import Batcher
from imageq.workers.runtime.control import JobControl
from imageq.workers.runtime.lifecycle import Built, WorkerContext

# Six decimals: far below any meaningful difference between two scores, and the output
# of a full 512 x 64 job stays well under a megabyte in the record and the webhook.
DECIMALS = 6


MatchBatcher = Batcher[MatchItem, MatchResult]


class MatchHandler:
    def __init__(
        self, ctx: WorkerContext, predictor: MatchPredictor, batcher: MatchBatcher
    ) -> None:
        self.ctx = ctx
        self.predictor = predictor
        self.batcher = batcher

    def handle(self, job: JobDocument, inp: MatchInput, control: JobControl) -> dict[str, Any]:
        with self.batcher.incoming() as ticket:
            truncated = self._check_texts(inp.texts)
            side = decode_side(self.predictor.input_side)
            images = load_job_images(inp.images, self.ctx.settings, self.ctx.storage, side)
            control.check()
            # One item per image: the batcher's size limit counts images, as for
            # captions, and the predictor runs the vision encoder once per image for
            # all its texts.
            # Pixels on this job's thread, not the batcher's (BlipPredictor.preprocess);
            # images decoded one at a time, each kept only as its tensor.
            items = [
                MatchItem(
                    PREPROCESSED, list(inp.texts), self.predictor.preprocess(image, inp.resize)
                )
                for image in images
            ]
            ran = self.batcher.run(
                items,
                control.check,
                ticket,
                control.images_progress("matching", len(items)),
                charge=control.charge_model,
            )
        control.metrics.update(
            batch_size=max(r.batch_size for r in ran),
            images=len(items),
            texts=len(inp.texts),
            pairs=len(items) * len(inp.texts),
        )
        return {
            "texts": list(inp.texts),
            "scores": [self._scores(i, r.result, inp.texts) for i, r in enumerate(ran)],
            "truncated": truncated,
            "max_text_tokens": self.predictor.max_text_tokens,
        }

    def _check_texts(self, texts: list[str]) -> list[int]:
        """Refuse texts the tokenizer reduces to nothing; return those it must cut."""
        counts = self.predictor.text_token_counts(texts)
        for j, count in enumerate(counts):
            if count == 0:
                raise InvalidInput(
                    f"input.texts[{j}]: the text has no tokens (only control or "
                    "zero-width characters)"
                )
        # [CLS] and [SEP] take two of the model's positions.
        room = self.predictor.max_text_tokens - 2
        return [j for j, count in enumerate(counts) if count > room]

    @staticmethod
    def _scores(index: int, result: MatchResult, texts: list[str]) -> dict[str, Any]:
        itm = [round(s, DECIMALS) for s in result.itm]
        cosine = [round(s, DECIMALS) for s in result.cosine]
        best = result.best
        return {
            "index": index,
            "itm": itm,
            "cosine": cosine,
            "best": {
                "text_index": best,
                "text": texts[best],
                "itm": itm[best],
                "cosine": cosine[best],
            },
        }


def match_probe(predictor: MatchPredictor) -> RunBatch:
    """Synthetic batches to measure the batch size with: preprocessed as job threads hand
    them over, each image against two texts."""
    image = Image.new("RGB", (640, 480), (90, 120, 150))
    pixels = predictor.preprocess(image)
    texts = ["a photo of a dog on a beach", "two people riding bicycles in the city"]

    def run(n: int) -> None:
        predictor.predict([MatchItem(image, texts, pixels) for _ in range(n)])

    return run


def build(ctx: WorkerContext, device: str) -> Built:
    """The match worker: one warm BLIP-ITM behind a micro-batcher."""
    settings = ctx.settings
    predictor = MatchPredictor(settings.model_match, speed=SpeedOptions.from_settings(settings))
    predictor.setup(device)
    max_batch, autobatch = for_worker(settings, device, match_probe(predictor))
    batcher = MatchBatcher(
        predictor, max_batch=max_batch, max_wait_ms=settings.max_batch_wait_ms, autobatch=autobatch
    )
    batcher.start()
    return {"match": MatchHandler(ctx, predictor, batcher)}, [batcher.stop]
