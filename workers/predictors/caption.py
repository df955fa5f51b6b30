"""BLIP captioning: one warm ``BlipForConditionalGeneration``, batched generation.

A batch runs the vision encoder once over all its images and then the text decoder's
``generate``, exactly as ``BlipForConditionalGeneration.generate`` does, but keeps the
image embeddings so that attention maps need no second vision pass. Items of one batch
share a ``batch_key``: the same prompt, generation options, adapter and attention flag.

Adapters are LoRA weights for the text decoder, trained with peft and saved with
``save_pretrained`` (``adapter_config.json`` + ``adapter_model.safetensors``), either on
the whole ``BlipForConditionalGeneration`` or on its ``text_decoder``. An adapter may
carry its own vocabulary (``imageq.workers.predictors.caption_vocab``): its batches then
tokenize, embed, score and decode with it, and every other batch with the base's.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from imageq.api_client.errors import ImageqError, InvalidInput, ModelError
from imageq.api_client.inputs import GenerationOptions
from imageq.workers.ops.devices import SpeedOptions
from imageq.workers.predictors.attention import overlay_png
from imageq.workers.predictors.base import BatchedPredictor, model_errors
from imageq.workers.predictors.blip import BlipPredictor, check_local_model, load_checked
from imageq.workers.predictors.caption_attention import Writing, sequence_attention

if TYPE_CHECKING:
    import torch

    from imageq.workers.predictors.caption_vocab import AdapterVocabulary
    from imageq.workers.predictors.framing import Frame, Resize

# The loading helpers stay importable from here: the training code and the finetune
# kind import them from this module (their home is workers.predictors.blip).
__all__ = [
    "CaptionItem",
    "CaptionPredictor",
    "CaptionResult",
    "check_local_model",
    "load_checked",
    "model_errors",
    "overlay_png",
]

# peft prefixes every key of a ``PeftModel.save_pretrained`` with this.
_PEFT_PREFIX = "base_model.model."


@dataclass
class CaptionItem:
    image: Image.Image
    prompt: str | None = None
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    adapter: str | None = None
    attention: bool = False
    #: ``image`` preprocessed on the job's thread (``preprocess``); None: on the batch's.
    pixels: torch.Tensor | None = None
    #: How ``image`` becomes the input (None: the processor's own way, a stretch).
    resize: Resize | None = None
    #: Where ``image`` lies on the input, made with ``pixels`` (``BlipPredictor.prepare``).
    frame: Frame | None = None


@dataclass(frozen=True)
class _Words:
    """The tokenizer and special ids one batch writes with: an adapter's or the base's."""

    tokenizer: Any
    bos: int
    eos: int
    pad: int

    @classmethod
    def of(cls, vocabulary: AdapterVocabulary | None, base: Any, text_config: Any) -> _Words:
        if vocabulary is not None:
            v = vocabulary
            return cls(v.tokenizer, v.bos_token_id, v.eos_token_id, v.pad_token_id)
        c = text_config
        return cls(base, c.bos_token_id, c.sep_token_id, c.pad_token_id)


@dataclass
class CaptionResult:
    #: One caption per returned sequence, best first (``num_return_sequences`` of them).
    texts: list[str]
    #: The attention payload (see ``imageq.workers.predictors.attention``) of each returned
    #: sequence, in the order of ``texts``, when the item asked for attention.
    attentions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def attention(self) -> dict[str, Any] | None:
        """The best sequence's attention payload (None: not asked for)."""
        return self.attentions[0] if self.attentions else None

    @property
    def text(self) -> str:
        return self.texts[0]


class CaptionPredictor(BlipPredictor, BatchedPredictor[CaptionItem, CaptionResult]):
    """Holds one BLIP captioning model; nothing loads before ``setup``."""

    kind = "caption"

    def __init__(
        self, model_id: str, *, half_precision: bool = True, speed: SpeedOptions | None = None
    ) -> None:
        super().__init__(model_id, half_precision=half_precision, speed=speed)
        self._adapters: set[str] = set()
        # Adapters that write with their own tokenizer and embedding rows.
        self._vocabularies: dict[str, AdapterVocabulary] = {}
        # The batcher thread runs ``predict`` while another thread may load an adapter.
        self._lock = threading.RLock()

    # -- lifecycle ----------------------------------------------------------------------
    def _model_class(self) -> Any:
        from transformers import BlipForConditionalGeneration

        return BlipForConditionalGeneration

    def _warm_up(self) -> None:
        self.predict([CaptionItem(Image.new("RGB", (64, 64)), None, GenerationOptions())])

    @property
    def dtype(self) -> torch.dtype:
        return self._require_model().dtype

    # -- batching -----------------------------------------------------------------------
    def batch_key(self, item: CaptionItem) -> Hashable:
        generation = item.generation
        # A seed means nothing to greedy or beam search: it must not split their batches.
        exclude = None if generation.do_sample else {"seed"}
        options = tuple(generation.model_dump(exclude=exclude).items())
        # ``resize`` is not in the key: every mode gives the same input size.
        return (item.prompt, options, item.adapter, item.attention)

    def predict(self, batch: Sequence[CaptionItem]) -> list[CaptionResult]:
        """One result per item, in order; incompatible items run as separate passes."""
        import torch

        self._require_model()
        results: list[CaptionResult | None] = [None] * len(batch)
        groups: dict[Hashable, list[int]] = {}
        for i, item in enumerate(batch):
            groups.setdefault(self.batch_key(item), []).append(i)
        with self._lock, torch.inference_mode(), model_errors("caption"):
            for indices in groups.values():
                outputs = self._run([batch[i] for i in indices])
                for i, result in zip(indices, outputs, strict=True):
                    results[i] = result
        return [r for r in results if r is not None]

    # -- one compatible group -------------------------------------------------------------
    def _run(self, items: Sequence[CaptionItem]) -> list[CaptionResult]:
        from imageq.workers.predictors.caption_sampling import seeded
        from imageq.workers.predictors.caption_vocab import swapped

        adapter = items[0].adapter
        vocabulary = self._vocabularies.get(adapter) if adapter is not None else None
        # The adapter's rows stand in for the base's only while its own batch runs.
        with swapped(self.model.text_decoder, vocabulary):
            options = items[0].generation
            if not (options.do_sample and options.seed is not None):
                return self._generate(items, vocabulary)
            # A seeded sample is drawn alone, from the seed's own random state: a
            # caption must not depend on what else shares its batch (caption_sampling).
            out = []
            for item in items:
                with seeded(options.seed, self.device):
                    out.extend(self._generate([item], vocabulary))
            return out

    def _generate(
        self, items: Sequence[CaptionItem], vocabulary: AdapterVocabulary | None
    ) -> list[CaptionResult]:
        import torch

        first = items[0]
        options = first.generation
        model = self.model
        text_config = model.config.text_config
        words = _Words.of(vocabulary, self.processor.tokenizer, text_config)
        prompt_ids = self._prompt_ids(first.prompt, words)
        if len(prompt_ids) + options.max_new_tokens > text_config.max_position_embeddings:
            raise InvalidInput(
                f"prompt ({len(prompt_ids) - 1} tokens) plus max_new_tokens "
                f"({options.max_new_tokens}) exceeds the model's "
                f"{text_config.max_position_embeddings} positions"
            )
        self._use_adapter(first.adapter)

        prepared = [
            (i.pixels, i.frame) if i.pixels is not None else self.prepare(i.image, i.resize)
            for i in items
        ]
        pixels = torch.stack([p for p, _ in prepared]).to(self.device, model.dtype)
        image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state
        n = image_embeds.shape[0]
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        input_ids = torch.tensor([prompt_ids] * n, dtype=torch.long, device=self.device)

        sequences = model.text_decoder.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            eos_token_id=words.eos,
            pad_token_id=words.pad,
            **self._generate_kwargs(options),
        )
        k = options.num_return_sequences
        texts = [
            t.strip() for t in words.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        ]
        results = [CaptionResult(texts=texts[i * k : (i + 1) * k]) for i in range(n)]
        if first.attention:
            # generate() keeps no cross-attentions, so score every returned sequence
            # again: sequence j of image i is row i * k + j.
            frames = [frame for _, frame in prepared for _ in range(k)]
            payloads = sequence_attention(
                model,
                sequences,
                image_embeds.repeat_interleave(k, dim=0),
                len(prompt_ids),
                texts,
                Writing(words.tokenizer, words.eos, words.pad),
                frames,
            )
            for i, result in enumerate(results):
                result.attentions = payloads[i * k : (i + 1) * k]
        return results

    def _prompt_ids(self, prompt: str | None, words: _Words | None = None) -> list[int]:
        """BLIP's decoder input: [DEC] then the prompt's tokens, without [CLS]/[SEP].

        ``BlipForConditionalGeneration.generate`` builds the same by overwriting [CLS]
        with the bos id and cutting the trailing [SEP]. ``words``: an adapter's own
        tokenizer and ids (default: the base's).
        """
        if words is None:
            words = _Words.of(None, self.processor.tokenizer, self.model.config.text_config)
        if not prompt:
            return [words.bos]
        ids = words.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return [words.bos, *ids]

    @staticmethod
    def _generate_kwargs(options: GenerationOptions) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": options.max_new_tokens,
            "min_new_tokens": options.min_new_tokens,
            "num_beams": options.num_beams,
            "num_return_sequences": options.num_return_sequences,
            "repetition_penalty": options.repetition_penalty,
            "do_sample": options.do_sample,
        }
        # Passing sampling knobs to greedy or beam search only earns warnings.
        if options.do_sample:
            kwargs.update(top_k=options.top_k, top_p=options.top_p, temperature=options.temperature)
        return kwargs

    # -- adapters -----------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        """Names of the LoRA adapters loaded into the text decoder."""
        return sorted(self._adapters)

    def vocabulary(self, name: str) -> AdapterVocabulary | None:
        """The loaded adapter ``name``'s own vocabulary (None: it writes with the base's)."""
        return self._vocabularies.get(name)

    def load_adapter(self, name: str, path: Path) -> None:
        """Load a peft LoRA adapter for the text decoder under ``name`` (replacing one).

        Only ``adapter_model.safetensors`` is read (never a pickle). Every weight must sit
        in the text decoder; the modules to adapt come from the weights themselves, so
        an adapter trained on the whole model and one trained on ``text_decoder`` load
        the same way. An adapter with ``vocabulary.safetensors`` also brings its tokenizer
        and embedding rows. The adapter stays inactive until an item names it.
        """
        from peft import LoraConfig, PeftConfig
        from peft.functional import inject_adapter_in_model, set_peft_model_state_dict
        from safetensors.torch import load_file

        from imageq.workers.predictors.caption_vocab import AdapterVocabulary

        decoder = self._require_model().text_decoder
        path = Path(path)
        weights_file = path / "adapter_model.safetensors"
        if not (path / "adapter_config.json").is_file() or not weights_file.is_file():
            raise ModelError(
                f"adapter {name!r}: {path} needs adapter_config.json and "
                "adapter_model.safetensors (safetensors only)"
            )
        with self._lock:
            try:
                config = PeftConfig.from_pretrained(str(path))
                if not isinstance(config, LoraConfig):
                    raise ModelError(f"adapter {name!r}: only LoRA adapters are supported")
                state = _decoder_state(load_file(str(weights_file)))
                vocabulary = AdapterVocabulary.load(path, decoder, self.device, self.dtype)
                if name in self._adapters:
                    self.unload_adapter(name)
                # Target exactly the modules the weights adapt, whatever patterns the
                # adapter was trained with, so nothing outside the decoder is touched.
                config.target_modules = sorted({key.split(".lora_", 1)[0] for key in state})
                config.inference_mode = True
                with warnings.catch_warnings():
                    # peft warns that a second adapter joins the first: that is the point.
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    inject_adapter_in_model(config, decoder, adapter_name=name)
                self._adapters.add(name)
                result: Any = set_peft_model_state_dict(decoder, state, adapter_name=name)
                missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
                if result.unexpected_keys or missing:
                    raise ModelError(
                        f"adapter {name!r}: weights do not fit the decoder (unexpected: "
                        f"{sorted(result.unexpected_keys)[:3]}, missing: {sorted(missing)[:3]})"
                    )
                decoder.to(self.device)
                self._use_adapter(None)
                if vocabulary is not None:
                    self._vocabularies[name] = vocabulary
            except Exception as exc:
                if name in self._adapters:
                    self.unload_adapter(name)
                if isinstance(exc, ImageqError):
                    raise
                raise ModelError(f"adapter {name!r}: cannot load from {path}: {exc}") from exc

    def unload_adapter(self, name: str) -> None:
        from peft.functional import delete_adapter

        with self._lock:
            if name in self._adapters:
                delete_adapter(self._require_model().text_decoder, name, prefix="lora_")
                self._adapters.discard(name)
            self._vocabularies.pop(name, None)

    def _use_adapter(self, name: str | None) -> None:
        from peft.functional import set_adapter
        from peft.tuners.tuners_utils import BaseTunerLayer

        if name is not None and name not in self._adapters:
            raise InvalidInput(f"adapter: caption adapter {name!r} is not loaded on this worker")
        if not self._adapters:
            return
        decoder = self.model.text_decoder
        if name is not None:
            set_adapter(decoder, name, inference_mode=True)
        for module in decoder.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(name is not None)


def _decoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's weights keyed relative to ``text_decoder``; refuse anything else."""
    out = {}
    for key, value in state.items():
        rel = key.removeprefix(_PEFT_PREFIX)
        rel = rel.removeprefix("text_decoder.")
        if not rel.startswith(("bert.", "cls.")) or ".lora_" not in rel:
            raise ModelError(f"adapter weight {key!r} is not a LoRA weight of the text decoder")
        out[rel] = value
    if not out:
        raise ModelError("adapter has no weights")
    return out
