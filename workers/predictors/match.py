"""BLIP image-text matching: ITM probability and ITC cosine for every image and text.

The vision encoder runs once per image (all images of a batch in one pass); its
embeddings then serve every text. Scores equal ``BlipForImageTextRetrieval.forward``:

- ITM: the text encoder reads the text with cross-attention over the image embeddings,
  ``softmax(itm_head(cls))[1]`` is the match probability;
- ITC: ``normalize(vision_proj(image_embeds[:, 0]))`` against
  ``normalize(text_proj(text_encoder(text alone)[:, 0]))``, their cosine.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from imageq.api_client.errors import ModelError
from imageq.workers.ops.devices import SpeedOptions
from imageq.workers.predictors.base import BatchedPredictor, model_errors
from imageq.workers.predictors.blip import BlipPredictor

if TYPE_CHECKING:
    import torch


@dataclass
class MatchItem:
    image: Image.Image
    texts: list[str]
    #: ``image`` preprocessed on the job's thread (``preprocess``); None: on the batch's.
    pixels: torch.Tensor | None = None


@dataclass
class MatchResult:
    #: ITM match probability per text, in [0, 1].
    itm: list[float]
    #: ITC cosine similarity per text, in [-1, 1].
    cosine: list[float]

    @property
    def best(self) -> int:
        """Index of the text with the highest match probability."""
        return max(range(len(self.itm)), key=self.itm.__getitem__)


class MatchPredictor(BlipPredictor, BatchedPredictor[MatchItem, MatchResult]):
    """Holds one BLIP retrieval model; nothing loads before ``setup``."""

    kind = "match"

    def __init__(
        self,
        model_id: str,
        *,
        half_precision: bool = True,
        max_pairs_per_pass: int = 256,
        speed: SpeedOptions | None = None,
    ) -> None:
        super().__init__(model_id, half_precision=half_precision, speed=speed)
        # Bounds the memory of the ITM pass: images x texts pairs can reach 512 x 64.
        self.max_pairs_per_pass = max(1, max_pairs_per_pass)
        self._lock = threading.Lock()
        # A second tokenizer for the job threads' checks: a fast tokenizer's truncation
        # settings are mutable state, so one instance must not serve two threads at once.
        self._check_tokenizer: Any = None
        self._check_lock = threading.Lock()

    def _model_class(self) -> Any:
        from transformers import BlipForImageTextRetrieval

        return BlipForImageTextRetrieval

    def _loaded(self) -> None:
        self._check_tokenizer = copy.deepcopy(self.processor.tokenizer)

    def _warm_up(self) -> None:
        self.predict([MatchItem(Image.new("RGB", (64, 64)), ["a photo"])])

    def _unload(self) -> None:
        super()._unload()
        self._check_tokenizer = None

    @property
    def max_text_tokens(self) -> int:
        """Texts are cut to this many tokens: the tokenizer's and the model's limit."""
        positions = int(self.model.config.text_config.max_position_embeddings)
        return min(int(self.processor.tokenizer.model_max_length), positions)

    def text_token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens in each text before truncation, without [CLS] and [SEP].

        A job thread calls this before its items join a batch: a text with no tokens
        (only control or zero-width characters) is refused as bad input, and one over
        ``max_text_tokens - 2`` is reported as truncated. Safe to call while a batch runs.
        """
        if self._check_tokenizer is None:
            raise ModelError("match model is not loaded: call setup() first")
        if not texts:
            return []
        with self._check_lock:
            # verbose=False: counting a text over the limit is the point, not a mistake.
            ids = self._check_tokenizer(list(texts), add_special_tokens=False, verbose=False)[
                "input_ids"
            ]
        return [len(row) for row in ids]

    def batch_key(self, item: MatchItem) -> Hashable:
        # Every item can share a pass: texts are encoded per pair anyway.
        return "match"

    def predict(self, batch: Sequence[MatchItem]) -> list[MatchResult]:
        import torch

        self._require_model()
        if not batch:
            return []
        with self._lock, torch.inference_mode(), model_errors("match"):
            return self._run(batch)

    def _run(self, batch: Sequence[MatchItem]) -> list[MatchResult]:
        import torch
        from torch.nn.functional import normalize

        model = self.model
        pixels = self.pixel_batch([i.image for i in batch], [i.pixels for i in batch])
        image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state
        image_feat = normalize(model.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)

        # The same text asked by several images is encoded once.
        unique: dict[str, int] = {}
        for item in batch:
            for text in item.texts:
                unique.setdefault(text, len(unique))
        tokens = self.processor.tokenizer(
            list(unique),
            padding="longest",
            truncation=True,
            max_length=self.max_text_tokens,
            return_tensors="pt",
        ).to(self.device)
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        text_feat = torch.cat(
            [self._text_features(ids[s], mask[s]) for s in self._slices(len(unique))]
        )
        pairs = [(i, unique[text]) for i, item in enumerate(batch) for text in item.texts]
        similarity = (image_feat @ text_feat.T).tolist()
        cosine = [similarity[i][t] for i, t in pairs]
        itm: list[float] = []
        for s in self._slices(len(pairs)):
            chunk = pairs[s]
            images = torch.tensor([i for i, _ in chunk], device=self.device)
            texts = torch.tensor([t for _, t in chunk], device=self.device)
            itm.extend(self._itm(image_embeds[images], ids[texts], mask[texts]).tolist())

        results = []
        start = 0
        for item in batch:
            end = start + len(item.texts)
            results.append(MatchResult(itm=itm[start:end], cosine=cosine[start:end]))
            start = end
        return results

    def _slices(self, n: int) -> list[slice]:
        step = self.max_pairs_per_pass
        return [slice(s, min(s + step, n)) for s in range(0, n, step)]

    @staticmethod
    def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Right padding to the batch's longest text costs compute and changes no score.
        length = max(1, int(mask.sum(dim=1).max()))
        return ids[:, :length], mask[:, :length]

    def _text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from torch.nn.functional import normalize

        ids, mask = self._trim(ids, mask)
        hidden = self.model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return normalize(self.model.text_proj(hidden[:, 0, :]).float(), dim=-1)

    def _itm(
        self, image_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        import torch

        ids, mask = self._trim(ids, mask)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        hidden = self.model.text_encoder(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        logits = self.model.itm_head(hidden[:, 0, :]).float()
        return torch.softmax(logits, dim=-1)[:, 1]
