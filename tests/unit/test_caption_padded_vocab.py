"""Adapter vocabularies on a BLIP whose tokenizer does not list the decoder's start token
and whose embedding table is padded: new tokens take ids past both, never one the model
already uses, and captions never begin with a new token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from imageq.api_client.errors import ModelError
from imageq.api_client.inputs import GenerationOptions
from imageq.workers.predictors.blip import role_ids
from imageq.workers.predictors.caption import CaptionItem, CaptionPredictor
from imageq.workers.predictors.caption_vocab import VOCAB_FILE
from imageq.workers.testing.tiny import PADDED_ROWS_MULTIPLE, build_tiny_caption_padded
from imageq.workers.training.lora_caption import CaptionTrainer
from imageq.workers.training.vocabulary import first_new_id, initial_rows
from tests.helpers import cells
from tests.unit.test_caption_adapter_vocab import FRENCH, trained

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def padded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_caption_padded(tmp_path_factory.mktemp("padded") / "model")


@pytest.fixture(scope="module")
def french(padded: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[CaptionTrainer, Path]:
    return trained(padded, tmp_path_factory.mktemp("fr-padded"), FRENCH, "fr", steps=6)


def test_the_tiny_checkpoint_is_padded_and_lacks_its_start_token(padded: Path) -> None:
    predictor = CaptionPredictor(str(padded))
    predictor.setup("cpu")
    size = len(predictor.processor.tokenizer)
    rows = predictor.model.text_decoder.bert.embeddings.word_embeddings.num_embeddings
    bos = predictor.model.config.text_config.bos_token_id
    assert rows % PADDED_ROWS_MULTIPLE == 0 and rows > size
    assert bos >= size and "[DEC]" not in predictor.processor.tokenizer.get_vocab()


def test_first_new_id_is_past_tokenizer_table_and_roles() -> None:
    assert first_new_id(285, 320, {0, 3, 285}) == 320
    assert first_new_id(30524, 30524, {0, 102, 30522}) == 30524
    assert first_new_id(10, 10, {12}) == 13
    with pytest.raises(ModelError, match="embedding table"):
        first_new_id(12, 10, set())


def test_new_ids_never_reuse_an_id_the_model_uses(
    padded: Path, french: tuple[CaptionTrainer, Path]
) -> None:
    trainer, _ = french
    plan = trainer.vocabulary
    decoder = trainer.decoder.base_model.model
    rows = decoder.bert.embeddings.word_embeddings.base.num_embeddings
    assert plan.base_rows == rows
    new_ids = set(range(plan.base_rows, len(plan.tokenizer)))
    added_ids = set(plan.tokenizer.convert_tokens_to_ids(plan.added))
    assert added_ids == new_ids and min(added_ids) >= rows
    roles = role_ids(decoder.config)
    assert trainer.bos in roles and not roles & new_ids
    # The start id decodes to nothing and starts from the base model's own row.
    assert plan.tokenizer.decode([trainer.bos], skip_special_tokens=True) == ""
    base = decoder.bert.embeddings.word_embeddings.base
    bias = decoder.cls.predictions.decoder.base.bias
    rows, _ = initial_rows(
        plan, trainer.processor.tokenizer, base.weight.detach(), bias, [trainer.bos], 0
    )
    torch.testing.assert_close(rows[0], base.weight.detach()[trainer.bos].float())


def test_captions_never_start_with_a_new_token(
    padded: Path, french: tuple[CaptionTrainer, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer, folder = french
    predictor = CaptionPredictor(str(padded))
    predictor.setup("cpu")
    predictor.load_adapter("fr", folder)
    decoder = predictor.model.text_decoder
    generate = decoder.generate
    sequences: list[torch.Tensor] = []

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        out: torch.Tensor = generate(*args, **kwargs)
        sequences.append(out)
        return out

    monkeypatch.setattr(decoder, "generate", spy)
    gen = GenerationOptions(max_new_tokens=8, num_beams=2, num_return_sequences=2)
    results = predictor.predict([CaptionItem(cells(i), None, gen, "fr") for i in range(4)])
    vocabulary = predictor.vocabulary("fr")
    assert vocabulary is not None and vocabulary.bos_token_id == trainer.bos
    (out,) = sequences
    new_ids = set(range(trainer.vocabulary.base_rows, len(vocabulary.tokenizer)))
    assert set(out[:, 0].tolist()) == {trainer.bos} and trainer.bos not in new_ids
    texts = [t for r in results for t in r.texts]
    # What the caption says is exactly what the decoder wrote after its start token.
    rest = vocabulary.tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
    assert texts == [t.strip() for t in rest]
    assert any(i in new_ids for i in out[:, 1:].flatten().tolist())


def test_an_adapter_whose_new_ids_reuse_model_ids_is_refused(
    padded: Path, french: tuple[CaptionTrainer, Path], tmp_path: Path
) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    old = tmp_path / "old"
    old.mkdir()
    for path in french[1].iterdir():
        (old / path.name).write_bytes(path.read_bytes())
    with safe_open(str(old / VOCAB_FILE), framework="pt") as f:
        meta = dict(f.metadata())
    # As the adapter was numbered before: new tokens from the tokenizer's length.
    meta["base_rows"] = str(french[0].bos)
    save_file(load_file(str(old / VOCAB_FILE)), str(old / VOCAB_FILE), metadata=meta)
    predictor = CaptionPredictor(str(padded))
    predictor.setup("cpu")
    with pytest.raises(ModelError, match="inside the model"):
        predictor.load_adapter("old", old)
