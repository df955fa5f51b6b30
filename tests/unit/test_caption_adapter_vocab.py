"""Caption adapters that carry their own vocabulary, on the tiny BLIP: trained rows, saved
and loaded (by the predictor and by plain transformers + peft) give the same logits,
the base model is untouched, and batches never mix adapters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from imageq.api_client.errors import ModelError
from imageq.api_client.inputs import GenerationOptions, VocabularyOptions
from imageq.api_client.settings import Settings
from imageq.workers.io.storage import LocalStorage
from imageq.workers.predictors.caption import CaptionItem, CaptionPredictor
from imageq.workers.predictors.caption_vocab import VOCAB_FILE, swapped
from imageq.workers.training.checkpoints import CheckpointStore
from imageq.workers.training.datasets import Dataset, read_dataset
from imageq.workers.training.loop import LoopConfig, run_training
from imageq.workers.training.lora_caption import CaptionTrainer
from tests.helpers import cells

FRENCH = ["un chat noir sur un canapé", "une île", "Noël à Paris", "un café"]
JAPANESE = ["黒い猫", "白い犬", "赤いりんご", "青い空"]

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def dataset(root: Path, texts: list[str]) -> Dataset:
    root.mkdir(parents=True)
    lines = []
    for i, text in enumerate(texts):
        cells(i).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": text}, ensure_ascii=False))
    (root / "metadata.jsonl").write_text("\n".join(lines), encoding="utf-8")
    return read_dataset(root, Settings(), allow_missing_text=False)


def trained(
    model: Path, root: Path, texts: list[str], language: str, steps: int = 4, **kw: Any
) -> tuple[CaptionTrainer, Path]:
    """A trainer after ``steps`` steps and the folder its adapter was exported to."""
    settings = Settings(model_caption=str(model))
    trainer = CaptionTrainer(
        settings, "cpu", dataset(root / "data", texts), rank=4, alpha=8, language=language, **kw
    )
    config = LoopConfig(
        max_steps=steps,
        batch_size=2,
        learning_rate=5e-2,
        checkpoint_every=steps,
        seed=0,
        examples=len(texts),
    )
    store = CheckpointStore(LocalStorage(root / "storage"), "ck/")
    run_training(trainer, config, store, lambda step, total, extra: None)
    folder = root / "adapter"
    folder.mkdir()
    for name, data in trainer.export().items():
        (folder / name).write_bytes(data)
    return trainer, folder


def trainer_logits(trainer: CaptionTrainer, index: int) -> torch.Tensor:
    trainer.decoder.eval()
    ids = torch.tensor([trainer.token_ids[index]])
    with torch.no_grad():
        out = trainer.decoder(
            input_ids=ids, encoder_hidden_states=trainer.image_embeds[index][None]
        )
    logits: torch.Tensor = out.logits
    return logits


def decoder_logits(decoder: Any, ids: list[int], embeds: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = decoder(
            input_ids=torch.tensor([ids]), encoder_hidden_states=embeds[None]
        ).logits
    return logits


@pytest.fixture(scope="module")
def french(
    tiny_caption_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[CaptionTrainer, Path]:
    return trained(tiny_caption_model, tmp_path_factory.mktemp("fr"), FRENCH, "fr")


@pytest.fixture(scope="module")
def japanese(
    tiny_caption_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[CaptionTrainer, Path]:
    return trained(tiny_caption_model, tmp_path_factory.mktemp("ja"), JAPANESE, "ja")


@pytest.fixture(scope="module")
def serving(
    tiny_caption_model: Path,
    french: tuple[CaptionTrainer, Path],
    japanese: tuple[CaptionTrainer, Path],
) -> CaptionPredictor:
    predictor = CaptionPredictor(str(tiny_caption_model))
    predictor.setup("cpu")
    predictor.load_adapter("fr", french[1])
    predictor.load_adapter("ja", japanese[1])
    return predictor


def test_the_adapter_is_self_contained(french: tuple[CaptionTrainer, Path]) -> None:
    trainer, folder = french
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        VOCAB_FILE,
    ]
    info = trainer.published_info()
    assert info["language"] == "fr" and info["vocabulary"]["strategy"] == "extend"
    assert info["vocabulary"]["added"] == len(trainer.vocabulary.added) > 0
    # Rows for every new token and for the base tokens the captions use, [SEP] included.
    assert trainer.ids is not None
    ids = trainer.ids.tolist()
    base_rows = trainer.vocabulary.base_rows
    used = sorted({i for row in trainer.token_ids for i in row if i < base_rows})
    assert ids == used + list(range(base_rows, len(trainer.vocabulary.tokenizer)))
    assert trainer.sep in ids and trainer.bos in ids and info["vocabulary"]["rows"] == len(ids)
    # The rows train with the LoRA (and are checkpointed with it).
    names = [name for name, _ in trainer.trainable()]
    assert names[-2:] == ["vocabulary.embeddings", "vocabulary.bias"]


def test_saved_and_loaded_the_adapter_gives_the_same_logits(
    tiny_caption_model: Path, french: tuple[CaptionTrainer, Path], serving: CaptionPredictor
) -> None:
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import BlipForConditionalGeneration, PreTrainedTokenizerFast

    trainer, folder = french
    index = 0
    expected = trainer_logits(trainer, index)
    ids, embeds = trainer.token_ids[index], trainer.image_embeds[index]
    assert expected.shape[-1] == len(trainer.vocabulary.tokenizer)

    # The worker: LoRA and rows loaded into the shared model, swapped in for the batch.
    decoder = serving.model.text_decoder
    with serving._lock, swapped(decoder, serving.vocabulary("fr")):
        serving._use_adapter("fr")
        served = decoder_logits(decoder, ids, embeds)
        serving._use_adapter(None)
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=1e-5)

    # Plain transformers + peft: resize, write the rows and biases, load the LoRA.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    model = BlipForConditionalGeneration.from_pretrained(str(tiny_caption_model))
    plain = model.text_decoder
    plain.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with safe_open(str(folder / VOCAB_FILE), framework="pt") as f, torch.no_grad():
        rows = f.get_tensor("ids")
        plain.bert.embeddings.word_embeddings.weight[rows] = f.get_tensor("embeddings")
        plain.cls.predictions.bias[rows] = f.get_tensor("bias")
    loaded = PeftModel.from_pretrained(plain, str(folder)).eval()
    torch.testing.assert_close(decoder_logits(loaded, ids, embeds), expected, atol=1e-5, rtol=1e-5)


def test_jobs_without_the_adapter_see_the_base_model(
    tiny_caption_model: Path, serving: CaptionPredictor
) -> None:
    from transformers import BlipForConditionalGeneration

    fresh = BlipForConditionalGeneration.from_pretrained(str(tiny_caption_model)).eval()
    embeds = torch.randn(37, 32)
    ids = [5, 20, 30, 40]
    decoder = serving.model.text_decoder
    with serving._lock:
        serving._use_adapter(None)
        base = decoder_logits(decoder, ids, embeds)
    assert base.shape[-1] == fresh.config.text_config.vocab_size
    torch.testing.assert_close(base, decoder_logits(fresh.text_decoder, ids, embeds))
    gen = GenerationOptions(max_new_tokens=8)
    alone = CaptionPredictor(str(tiny_caption_model))
    alone.setup("cpu")
    image = cells(0)
    assert serving.predict([CaptionItem(image, None, gen)]) == alone.predict(
        [CaptionItem(image, None, gen)]
    )


def test_batches_never_mix_adapters_and_decode_with_their_own_tokenizer(
    serving: CaptionPredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = GenerationOptions(max_new_tokens=6)
    adapters = ["fr", None, "ja", "fr", None]
    items = [CaptionItem(cells(i), None, gen, adapter) for i, adapter in enumerate(adapters)]
    passes: list[tuple[str | None, int, str]] = []
    generate = serving._generate

    def spy(group: Any, vocabulary: Any) -> Any:
        word_embeddings = serving.model.text_decoder.bert.embeddings.word_embeddings
        passes.append((group[0].adapter, len(group), type(word_embeddings).__name__))
        return generate(group, vocabulary)

    monkeypatch.setattr(serving, "_generate", spy)
    results = serving.predict(items)
    assert sorted(passes, key=str) == sorted(
        [("fr", 2, "VocabEmbedding"), (None, 2, "Embedding"), ("ja", 1, "VocabEmbedding")],
        key=str,
    )
    # Outside its batch no adapter is left in the decoder.
    assert type(serving.model.text_decoder.bert.embeddings.word_embeddings).__name__ == "Embedding"
    tokenizers = {"fr": serving.vocabulary("fr"), "ja": serving.vocabulary("ja")}
    for item, result in zip(items, results, strict=True):
        if item.adapter is not None:
            vocabulary = tokenizers[item.adapter]
            assert vocabulary is not None
            ids = vocabulary.tokenizer(result.text, add_special_tokens=False)["input_ids"]
            assert vocabulary.tokenizer.decode(ids) == result.text


def test_a_checkpoint_carries_the_rows(french: tuple[CaptionTrainer, Path]) -> None:
    trainer = french[0]
    state = trainer.adapter_state()
    assert trainer.ids is not None
    assert state["vocabulary.embeddings"].shape[0] == len(trainer.ids)
    before = trainer.rows.detach().clone() if trainer.rows is not None else None
    trainer.load_adapter_state({k: v.clone() for k, v in state.items()})
    assert before is not None and trainer.rows is not None
    assert torch.equal(trainer.rows.detach(), before)
    bad = dict(state, **{"vocabulary.embeddings": state["vocabulary.embeddings"][:1]})
    with pytest.raises(ModelError, match="vocabulary does not fit"):
        trainer.load_adapter_state(bad)


def test_replace_reinitialises_every_row_and_serves(
    tiny_caption_model: Path,
    french: tuple[CaptionTrainer, Path],
    tmp_path: Path,
) -> None:
    # The French adapter's tokenizer as the job's own: a vocabulary of 300-odd tokens.
    folder = tmp_path / "tokenizer"
    french[0].vocabulary.tokenizer.save_pretrained(folder)
    options = VocabularyOptions(strategy="replace", tokenizer="file:///unused/")
    trainer, adapter = trained(
        tiny_caption_model, tmp_path, FRENCH, "fr", vocabulary=options, tokenizer_dir=folder
    )
    plan = trainer.vocabulary
    assert (plan.strategy, plan.base_rows) == ("replace", 0)
    assert trainer.rows is not None and trainer.rows.shape[0] == len(plan.tokenizer)
    predictor = CaptionPredictor(str(tiny_caption_model))
    predictor.setup("cpu")
    predictor.load_adapter("fr-replace", adapter)
    decoder = predictor.model.text_decoder
    with predictor._lock, swapped(decoder, predictor.vocabulary("fr-replace")):
        predictor._use_adapter("fr-replace")
        served = decoder_logits(decoder, trainer.token_ids[1], trainer.image_embeds[1])
        predictor._use_adapter(None)
    torch.testing.assert_close(served, trainer_logits(trainer, 1), atol=1e-5, rtol=1e-5)
    text = predictor.predict([CaptionItem(cells(1), None, GenerationOptions(), "fr-replace")])
    assert isinstance(text[0].text, str)


def test_a_vocabulary_that_does_not_fit_is_refused(
    tiny_caption_model: Path, french: tuple[CaptionTrainer, Path], tmp_path: Path
) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for path in french[1].iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    with safe_open(str(broken / VOCAB_FILE), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(broken / VOCAB_FILE))
    # One row short of the tokenizer.
    short = {name: tensor[:-1] for name, tensor in tensors.items()}
    save_file(short, str(broken / VOCAB_FILE), metadata=meta)
    predictor = CaptionPredictor(str(tiny_caption_model))
    predictor.setup("cpu")
    with pytest.raises(ModelError, match="does not fit"):
        predictor.load_adapter("broken", broken)
    assert predictor.adapters == [] and predictor.vocabulary("broken") is None
