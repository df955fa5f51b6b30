"""LoRA on BLIP's text decoder from image-caption pairs (e.g. captions in another language).

The vision encoder stays frozen, so each image's embeddings are computed once before
training and reused at every step. The adapter is saved the way peft saves one
(``adapter_config.json`` + ``adapter_model.safetensors``), which is what
``CaptionPredictor.load_adapter`` reads. peft 0.21 predates transformers' own
``add_adapter`` for this model, hence ``peft.get_peft_model`` on the decoder.
"""

from __future__ import annotations

import tempfile
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api_client.errors import ModelError
from api_client.settings import Settings
from workers.training.datasets import Dataset
from workers.training.loop import lora_config

if TYPE_CHECKING:
    import torch

# LoRA on the decoder's self- and cross-attention and its dense layers.
TARGET_MODULES = ("query", "key", "value", "dense")
# Captions longer than this many tokens are cut: BLIP's are short.
MAX_CAPTION_TOKENS = 64
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_ENCODE_CHUNK = 16


class CaptionTrainer:
    def __init__(
        self,
        settings: Settings,
        device: str,
        dataset: Dataset,
        *,
        rank: int,
        alpha: float,
    ) -> None:
        import torch
        from peft import get_peft_model
        from transformers import BlipForConditionalGeneration, BlipProcessor

        from workers.predictors.caption import check_local_model, load_checked

        self.device = device
        self.base_model = settings.model_caption
        check_local_model(self.base_model)
        model = load_checked(BlipForConditionalGeneration, self.base_model, torch.float32)
        model.requires_grad_(False)
        self.processor = BlipProcessor.from_pretrained(self.base_model)
        text_config = model.config.text_config
        self.bos, self.sep, self.pad = (
            text_config.bos_token_id,
            text_config.sep_token_id,
            text_config.pad_token_id,
        )
        self.max_tokens = min(MAX_CAPTION_TOKENS, text_config.max_position_embeddings - 2)
        model.to(device)
        # bfloat16 autocast on a GPU; the LoRA weights and the optimizer stay in float32.
        self.autocast_dtype = (
            torch.bfloat16 if settings.half_precision and device.startswith("cuda") else None
        )
        self.image_embeds = self._encode_images(model, dataset, settings)
        self.token_ids = self._tokenize([e.text or "" for e in dataset.examples])
        config = lora_config(rank, alpha, TARGET_MODULES, lora_dropout=0.0)
        self.decoder = get_peft_model(model.text_decoder, config)
        # Training mode for the decoder's dropout; the vision encoder (only its outputs
        # are needed) goes with ``model`` when this returns.
        self.decoder.train()

    def _autocast(self) -> AbstractContextManager[Any]:
        import torch

        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)

    def _encode_images(
        self, model: Any, dataset: Dataset, settings: Settings
    ) -> list[torch.Tensor]:
        import torch

        embeds: list[torch.Tensor] = []
        examples = list(dataset.examples)
        with torch.inference_mode():
            for i in range(0, len(examples), _ENCODE_CHUNK):
                images = [e.load(settings) for e in examples[i : i + _ENCODE_CHUNK]]
                pixels = self.processor.image_processor(images=images, return_tensors="pt")[
                    "pixel_values"
                ].to(self.device)
                with self._autocast():
                    out = model.vision_model(pixel_values=pixels).last_hidden_state
                embeds.extend(out.float().to("cpu").unbind(0))
        return embeds

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        encoded = self.processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
        out = []
        for text, ids in zip(texts, encoded, strict=True):
            if not ids:
                raise ModelError(f"caption {text!r} has no tokens in the model's vocabulary")
            # BLIP's decoder reads [DEC] first and stops at [SEP], as the predictor does.
            out.append([self.bos, *ids[: self.max_tokens], self.sep])
        return out

    # -- Trainer ------------------------------------------------------------------------
    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.decoder.named_parameters() if p.requires_grad]

    def loss(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        import torch

        rows = [self.token_ids[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        mask = (ids != self.pad).long()
        labels = ids.masked_fill(mask == 0, -100)
        embeds = torch.stack([self.image_embeds[i] for i in indices]).to(self.device)
        with self._autocast():
            out = self.decoder(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                encoder_hidden_states=embeds,
                labels=labels.to(self.device),
                reduction="mean",
            )
        loss: torch.Tensor = out.loss.float()
        return loss

    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return dict(get_peft_model_state_dict(self.decoder))

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result: Any = set_peft_model_state_dict(self.decoder, state)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            raise ModelError("the checkpoint's adapter does not fit this model")

    def export(self) -> dict[str, bytes]:
        with tempfile.TemporaryDirectory(prefix="imageq-caption-lora-") as tmp:
            self.decoder.save_pretrained(tmp, safe_serialization=True)
            return {name: (Path(tmp) / name).read_bytes() for name in ADAPTER_FILES}
