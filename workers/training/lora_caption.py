"""LoRA on BLIP's text decoder from image-caption pairs (e.g. captions in another language).

The vision encoder stays frozen, so each image's embeddings are computed once before
training and reused at every step. The adapter is saved the way peft saves one
(``adapter_config.json`` + ``adapter_model.safetensors``), which is what
``CaptionPredictor.load_adapter`` reads. peft 0.21 predates transformers' own
``add_adapter`` for this model, hence ``peft.get_peft_model`` on the decoder.

A caption adapter may also carry its own vocabulary (``imageq.workers.training.vocabulary``):
its tokenizer files and ``vocabulary.safetensors``, the embedding rows (tied to the
output layer, as BLIP's are) and output biases of its new tokens, trained with the LoRA.
"""

from __future__ import annotations

import tempfile
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imageq.api_client.errors import ModelError
from imageq.api_client.inputs import VocabularyOptions
from imageq.api_client.settings import Settings
from imageq.workers.predictors.blip import role_ids
from imageq.workers.training.datasets import Dataset
from imageq.workers.training.loop import lora_config
from imageq.workers.training.vocabulary import (
    VocabularyPlan,
    first_new_id,
    initial_rows,
    plan_vocabulary,
)

if TYPE_CHECKING:
    import torch

# LoRA on the decoder's self- and cross-attention and its dense layers.
TARGET_MODULES = ("query", "key", "value", "dense")
# Captions longer than this many tokens are cut (with the base vocabulary; an adapter
# with its own vocabulary refuses them): BLIP's are short.
MAX_CAPTION_TOKENS = 64
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# The vocabulary's tensors in a checkpoint's adapter file, beside the LoRA weights.
_ROWS, _BIAS = "vocabulary.embeddings", "vocabulary.bias"
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
        language: str | None = None,
        vocabulary: VocabularyOptions | None = None,
        tokenizer_dir: Path | None = None,
        seed: int = 0,
    ) -> None:
        import torch
        from peft import get_peft_model
        from transformers import BlipForConditionalGeneration, BlipProcessor

        from imageq.workers.predictors.caption import check_local_model, load_checked

        self.device = device
        self.base_model = settings.model_caption
        check_local_model(self.base_model)
        try:
            model = load_checked(BlipForConditionalGeneration, self.base_model, torch.float32)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(
                f"cannot load caption model {self.base_model!r} "
                f"(training loads safetensors weights only): {exc}"
            ) from exc
        model.requires_grad_(False)
        self.processor = BlipProcessor.from_pretrained(self.base_model)
        text_config = model.config.text_config
        self.max_tokens = min(MAX_CAPTION_TOKENS, text_config.max_position_embeddings - 2)
        # Every caption must be writable before any image is encoded (InvalidInput).
        captions = [(e.file_name, e.text or "") for e in dataset.examples]
        self.vocabulary: VocabularyPlan = plan_vocabulary(
            self.processor.tokenizer,
            captions,
            language=language,
            options=vocabulary,
            base_ids=(text_config.bos_token_id, text_config.sep_token_id, text_config.pad_token_id),
            max_tokens=self.max_tokens,
            replacement=tokenizer_dir,
            first_new=first_new_id(
                len(self.processor.tokenizer),
                model.text_decoder.bert.embeddings.word_embeddings.num_embeddings,
                role_ids(model.config, text_config),
            ),
        )
        plan = self.vocabulary
        self.bos, self.sep, self.pad = plan.bos_token_id, plan.eos_token_id, plan.pad_token_id
        self.label_smoothing = float(getattr(text_config, "label_smoothing", 0.0) or 0.0)
        model.to(device)
        # bfloat16 autocast on a GPU; the LoRA weights and the optimizer stay in float32.
        self.autocast_dtype = (
            torch.bfloat16 if settings.half_precision and device.startswith("cuda") else None
        )
        self.image_embeds = self._encode_images(model, dataset, settings)
        self.token_ids = self._tokenize([text for _, text in captions])
        config = lora_config(rank, alpha, TARGET_MODULES, lora_dropout=0.0)
        self.rows: torch.nn.Parameter | None = None
        self.bias: torch.nn.Parameter | None = None
        self.ids: torch.Tensor | None = None
        # peft draws LoRA's A matrices from the global generator: seeded, the same job
        # trains the same way on every worker, whatever ran in the process before.
        devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            self.decoder = get_peft_model(model.text_decoder, config)
            if plan.carries_tokenizer:
                self._attach_vocabulary(model.text_decoder, seed)
        # Training mode for the decoder's dropout; the vision encoder (only its outputs
        # are needed) goes with ``model`` when this returns.
        self.decoder.train()

    def _attach_vocabulary(self, decoder: Any, seed: int) -> None:
        """Rows for the adapter's ids: every new one, and the base tokens the captions
        use (their meaning, and where a caption ends, differ from language to language;
        measured on the tiny model, frozen base rows kept captions from coming back
        exactly)."""
        import torch

        from imageq.workers.predictors.caption_vocab import install, vocab_modules

        plan = self.vocabulary
        used = {i for row in self.token_ids for i in row if i < plan.base_rows}
        ids = sorted(used) + list(range(plan.base_rows, len(plan.tokenizer)))
        rows, bias = initial_rows(
            plan,
            self.processor.tokenizer,
            decoder.bert.embeddings.word_embeddings.weight.detach(),
            decoder.cls.predictions.bias.detach(),
            ids,
            seed,
        )
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.rows = torch.nn.Parameter(rows.to(self.device))
        self.bias = torch.nn.Parameter(bias.to(self.device))
        modules = vocab_modules(
            decoder, plan.base_rows, len(plan.tokenizer), self.ids, self.rows, self.bias
        )
        install(decoder, modules)

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
        encoded = self.vocabulary.tokenizer(texts, add_special_tokens=False)["input_ids"]
        out = []
        for text, ids in zip(texts, encoded, strict=True):
            if not ids:
                raise ModelError(f"caption {text!r} has no tokens in the model's vocabulary")
            # BLIP's decoder reads [DEC] first and stops at [SEP], as the predictor does.
            out.append([self.bos, *ids[: self.max_tokens], self.sep])
        return out

    # -- Trainer ------------------------------------------------------------------------
    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        named = [(n, p) for n, p in self.decoder.named_parameters() if p.requires_grad]
        return [(n, p) for n, p in named if "lora_" in n] + self._vocab_params()

    def _vocab_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        if self.rows is None or self.bias is None:
            return []
        return [(_ROWS, self.rows), (_BIAS, self.bias)]

    def loss(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        import torch
        import torch.nn.functional as F  # noqa: N812 (torch's own spelling)

        rows = [self.token_ids[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        embeds = torch.stack([self.image_embeds[i] for i in indices]).to(self.device)
        with self._autocast():
            logits = self.decoder(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                encoder_hidden_states=embeds,
            ).logits
        # BLIP's own loss (next-token cross-entropy with its label smoothing), computed
        # here because BLIP's reads the vocabulary size from the config, and an adapter
        # vocabulary has its own.
        loss: torch.Tensor = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1).to(self.device),
            ignore_index=-100,
            label_smoothing=self.label_smoothing,
        )
        return loss

    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        state = dict(get_peft_model_state_dict(self.decoder))
        state.update({name: p.detach() for name, p in self._vocab_params()})
        return state

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        import torch
        from peft import set_peft_model_state_dict

        state = dict(state)  # the checkpoint's own dict stays whole
        vocab = {name: state.pop(name) for name in (_ROWS, _BIAS) if name in state}
        params = dict(self._vocab_params())
        if set(vocab) != set(params):
            raise ModelError("the checkpoint's vocabulary does not fit this job's")
        for name, value in vocab.items():
            if value.shape != params[name].shape:
                raise ModelError("the checkpoint's vocabulary does not fit this job's")
            with torch.no_grad():
                params[name].copy_(value)
        result: Any = set_peft_model_state_dict(self.decoder, state)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            raise ModelError("the checkpoint's adapter does not fit this model")

    def export(self) -> dict[str, bytes]:
        with tempfile.TemporaryDirectory(prefix="imageq-caption-lora-") as tmp:
            self.decoder.save_pretrained(tmp, safe_serialization=True)
            files = {name: (Path(tmp) / name).read_bytes() for name in ADAPTER_FILES}
        files.update(self._vocabulary_files())
        return files

    def _vocabulary_files(self) -> dict[str, bytes]:
        """The tokenizer's files and ``vocabulary.safetensors`` (nothing for ``base``)."""
        from safetensors.torch import save

        from imageq.workers.predictors.caption_vocab import VOCAB_FILE, vocab_file_metadata

        if self.rows is None or self.bias is None or self.ids is None:
            return {}
        plan = self.vocabulary
        files = {}
        with tempfile.TemporaryDirectory(prefix="imageq-caption-tokenizer-") as tmp:
            plan.tokenizer.save_pretrained(tmp)
            for path in Path(tmp).iterdir():
                files[path.name] = path.read_bytes()
        tensors = {"embeddings": self.rows.detach(), "bias": self.bias.detach()}
        plain = {k: v.to("cpu").float().contiguous() for k, v in tensors.items()}
        plain["ids"] = self.ids.clone()
        meta = vocab_file_metadata(plan.strategy, plan.language, plan.base_rows, plan.special_ids())
        files[VOCAB_FILE] = save(plain, metadata=meta)
        return files

    def published_info(self) -> dict[str, Any]:
        """What the registry entry says about the adapter's language and vocabulary."""
        info = self.vocabulary.info()
        if self.ids is not None:
            # The adapter's own embedding rows: its new tokens and the base ones it uses.
            info["rows"] = len(self.ids)
        return {"language": self.vocabulary.language, "vocabulary": info}
