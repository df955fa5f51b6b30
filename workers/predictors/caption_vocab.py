"""A caption adapter's own vocabulary: its tokenizer and its embedding rows, at training
and serving time alike.

BLIP's text decoder reads token ids through ``bert.embeddings.word_embeddings`` and
scores the next token with ``cls.predictions.decoder``, a Linear whose weight is tied to
those embeddings (and whose bias is its own). An adapter that writes another language
brings its own rows for some ids (``ids``): ``extend`` for the tokens it appends after
the base vocabulary (base ids keep their meaning: ``base_rows`` is the base tokenizer's
length) and for the base tokens its captions use, [SEP] included, so that it learns what
they mean in its language and when its captions end; ``replace`` for every id
(``base_rows`` is 0). One row per id, tied between input and output as BLIP's are, and
one output bias.

The base model is never resized. While an adapter's batch runs, ``swapped`` puts a
``VocabEmbedding`` and a ``VocabLMHead`` in place of those two modules: they read and
score the adapter's ids with its rows and every other base id with the base weights
(shared, not copied). Outside that block the decoder is exactly the checkpoint's, so
jobs without the adapter, and jobs with other adapters, see nothing of it. peft's
``trainable_token_indices`` would need a resized base model, and in peft 0.21 its
tied-head wrapper drops the output bias (huggingface/peft#3649), which changes every
logit of a BERT-style head.

This module imports torch: the caption predictor and trainer import it lazily.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own spelling)
from torch import nn

from imageq.api_client.errors import ModelError
from imageq.workers.predictors.blip import role_ids

#: The adapter's rows: ``ids`` (the token ids they stand for), ``embeddings`` (one row
#: per id, tied to the output layer) and ``bias`` (their output bias); in the metadata,
#: the strategy, language, ``base_rows`` and special token ids.
VOCAB_FILE = "vocabulary.safetensors"
TOKENIZER_FILE = "tokenizer.json"


class _OwnRows(nn.Module):
    """Which ids an adapter's rows stand for: ``slot[id]`` is the id's row, or -1."""

    slot: torch.Tensor
    ids: torch.Tensor

    def __init__(self, base_rows: int, size: int, ids: torch.Tensor, rows: nn.Parameter) -> None:
        super().__init__()
        slot = torch.full((size,), -1, dtype=torch.long, device=rows.device)
        slot[ids.to(rows.device)] = torch.arange(len(ids), device=rows.device)
        self.register_buffer("slot", slot, persistent=False)
        self.register_buffer("ids", ids.to(rows.device), persistent=False)
        self.base_rows = base_rows
        self.size = size
        self.rows = rows


class VocabEmbedding(_OwnRows):
    """The adapter's ids from its rows, every other id from the base embedding."""

    base: nn.Embedding

    def __init__(
        self, base: nn.Embedding, base_rows: int, size: int, ids: torch.Tensor, rows: nn.Parameter
    ) -> None:
        super().__init__(base_rows, size, ids, rows)
        # A plain attribute, not a submodule: the base weights stay owned (and saved,
        # moved, counted) by the model alone.
        self.__dict__["base"] = base

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        slot = self.slot[ids]
        own = F.embedding(slot.clamp(min=0), self.rows)
        if not self.base_rows:
            return own
        base = self.base(ids.masked_fill(ids >= self.base_rows, 0))
        return torch.where((slot >= 0).unsqueeze(-1), own.to(base.dtype), base)


class VocabLMHead(_OwnRows):
    """Logits of the base ids from the base head, then the adapter's ids' from its rows."""

    base: nn.Linear

    def __init__(
        self,
        base: nn.Linear,
        base_rows: int,
        size: int,
        ids: torch.Tensor,
        rows: nn.Parameter,
        bias: nn.Parameter,
    ) -> None:
        super().__init__(base_rows, size, ids, rows)
        self.__dict__["base"] = base
        self.bias = bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        own = F.linear(hidden, self.rows.to(hidden.dtype), self.bias.to(hidden.dtype))
        shape = (*hidden.shape[:-1], self.size - self.base_rows)
        # A model whose embedding has padding rows past the tokenizer drops them here.
        parts = [self.base(hidden)[..., : self.base_rows]] if self.base_rows else []
        logits = torch.cat([*parts, hidden.new_zeros(shape)], dim=-1)
        return logits.index_copy(logits.dim() - 1, self.ids, own)


def vocab_modules(
    decoder: Any,
    base_rows: int,
    size: int,
    ids: torch.Tensor,
    rows: nn.Parameter,
    bias: nn.Parameter,
) -> tuple[VocabEmbedding, VocabLMHead]:
    """The pair of modules that ``swapped`` puts into ``decoder`` (a BLIP text decoder)."""
    embedding = VocabEmbedding(decoder.bert.embeddings.word_embeddings, base_rows, size, ids, rows)
    head = VocabLMHead(decoder.cls.predictions.decoder, base_rows, size, ids, rows, bias)
    return embedding, head


def install(decoder: Any, modules: tuple[Any, Any]) -> tuple[Any, Any]:
    """Put ``modules`` in place; returns what they replaced."""
    embeddings, predictions = decoder.bert.embeddings, decoder.cls.predictions
    replaced = (embeddings.word_embeddings, predictions.decoder)
    embeddings.word_embeddings, predictions.decoder = modules
    return replaced


@contextmanager
def swapped(decoder: Any, vocabulary: AdapterVocabulary | None) -> Iterator[None]:
    """The adapter's vocabulary in ``decoder`` for the body of the block (None: the base)."""
    if vocabulary is None:
        yield
        return
    replaced = install(decoder, vocabulary.modules)
    try:
        yield
    finally:
        install(decoder, replaced)


@dataclass
class AdapterVocabulary:
    """What a loaded caption adapter writes with: its tokenizer, ids and rows."""

    tokenizer: Any
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    modules: tuple[VocabEmbedding, VocabLMHead]

    @classmethod
    def load(
        cls, path: Path, decoder: Any, device: str, dtype: torch.dtype
    ) -> AdapterVocabulary | None:
        """The vocabulary in the adapter folder ``path`` (None: the adapter has none)."""
        from safetensors import safe_open
        from transformers import PreTrainedTokenizerFast

        vocab_file = path / VOCAB_FILE
        if not vocab_file.is_file():
            return None
        if not (path / TOKENIZER_FILE).is_file():
            raise ModelError(f"{path} has {VOCAB_FILE} but no {TOKENIZER_FILE}")
        with safe_open(str(vocab_file), framework="pt") as f:
            meta = dict(f.metadata() or {})
            names = set(f.keys())
            if names != {"ids", "embeddings", "bias"}:
                raise ModelError(f"{VOCAB_FILE} holds {sorted(names)}, not ids, embeddings, bias")
            ids, rows, bias = (f.get_tensor(k) for k in ("ids", "embeddings", "bias"))
        try:
            base_rows = int(meta["base_rows"])
            special = {k: int(meta[k]) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        except (KeyError, ValueError) as exc:
            raise ModelError(f"{VOCAB_FILE}: metadata lacks {exc}") from None
        # tokenizer.json only (no class named by the folder, so no code can be asked for).
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        base = decoder.bert.embeddings.word_embeddings
        size = len(tokenizer)
        ids = ids.long()
        problems = []
        if rows.shape[0] != len(ids) or bias.shape != ids.shape or ids.dim() != 1:
            problems.append(f"{len(ids)} ids for {rows.shape[0]} rows and {bias.shape} biases")
        elif len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= size):
            problems.append(f"ids outside the tokenizer's {size}")
        elif not set(range(base_rows, size)) <= set(ids.tolist()):
            # Ids past the base vocabulary have no base row to fall back on.
            problems.append(f"no row for some of the ids {base_rows}..{size - 1}")
        if rows.shape[1] != base.embedding_dim or base_rows > base.num_embeddings:
            problems.append(f"rows of {rows.shape[1]} for a decoder of {base.embedding_dim}")
        roles = role_ids(decoder.config)
        if base_rows and (base_rows < base.num_embeddings or max(roles, default=-1) >= base_rows):
            # New tokens numbered from the tokenizer's length would take ids the model
            # already uses (its [DEC] start token, padded rows): every caption would
            # begin with the first new token. Trained before the fix; train it again.
            problems.append(
                f"its new tokens start at id {base_rows}, inside the model's "
                f"{base.num_embeddings} embedding rows (ids {sorted(roles)} have roles)"
            )
        if any(not 0 <= i < size for i in special.values()):
            problems.append(f"special token ids {special} outside the vocabulary")
        if problems:
            raise ModelError(f"{VOCAB_FILE} does not fit: " + "; ".join(problems))
        params = [nn.Parameter(t.to(device, dtype), requires_grad=False) for t in (rows, bias)]
        return cls(
            tokenizer=tokenizer,
            modules=vocab_modules(decoder, base_rows, size, ids.to(device), *params),
            **special,
        )


def vocab_file_metadata(
    strategy: str, language: str | None, base_rows: int, special: dict[str, int]
) -> dict[str, str]:
    """The string metadata ``VOCAB_FILE`` carries (safetensors metadata is str -> str)."""
    meta = {"strategy": strategy, "language": language or "", "base_rows": str(base_rows)}
    meta.update({k: str(v) for k, v in special.items()})
    return meta
