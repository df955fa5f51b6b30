"""The decoder's cross-attention over the image for captions already written.

``generate`` keeps no cross-attentions, so the caption predictor scores each returned
sequence again with one teacher-forced decoder pass and turns the rows that chose its
tokens into attention payloads (``imageq.workers.predictors.attention``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from imageq.workers.predictors.attention import (
    attention_payload,
    patch_grid,
    summarise_cross_attention,
)

if TYPE_CHECKING:
    import torch

    from imageq.workers.predictors.framing import Frame


@dataclass(frozen=True)
class Writing:
    """The tokenizer the sequences were written with, and its end and padding ids."""

    tokenizer: Any
    sep: int
    pad: int


def sequence_attention(
    model: Any,
    sequences: torch.Tensor,
    image_embeds: torch.Tensor,
    prompt_len: int,
    texts: Sequence[str],
    writing: Writing,
    frames: Sequence[Frame | None],
) -> list[dict[str, Any]]:
    """One payload per row of ``sequences`` (``image_embeds`` and ``frames`` row by row)."""
    import torch

    sep, pad = writing.sep, writing.pad
    # Everything after a sequence's first [SEP] is padding from the batch.
    is_end = (sequences == sep) & (
        torch.arange(sequences.shape[1], device=sequences.device) >= prompt_len
    )
    after_end = (is_end.cumsum(dim=1) - is_end.long()) > 0
    outputs = model.text_decoder(
        input_ids=sequences,
        attention_mask=(~after_end).long(),
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=torch.ones(
            image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device
        ),
        output_attentions=True,
        return_dict=True,
    )
    grid = patch_grid(model.config.vision_config)
    layers, mean = summarise_cross_attention(outputs.cross_attentions, grid)
    tokenizer = writing.tokenizer
    special = set(tokenizer.all_special_ids) | {sep, pad}
    payloads = []
    for b, text in enumerate(texts):
        ids = sequences[b].tolist()
        # The token at position j was predicted from query j - 1: that row shows where
        # the decoder looked when it chose the token.
        positions = []
        for j in range(prompt_len, len(ids)):
            if ids[j] == sep:
                break
            if ids[j] not in special:
                positions.append(j)
        rows = [j - 1 for j in positions]
        tokens = tokenizer.convert_ids_to_tokens([ids[j] for j in positions])
        payloads.append(
            attention_payload(layers[b][:, rows], mean[b][rows], tokens, grid, text, frames[b])
        )
    return payloads
