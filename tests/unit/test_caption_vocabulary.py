"""The vocabulary a caption fine-tune writes with: the round trip, ``extend``, ``replace``.

BLIP's tokenizer is stood in for by a BERT-style uncased WordPiece (the tiny model's
words plus BERT's ``##a``..``##z``), in both layouts: [DEC]/[ENC] inside the vocabulary
(the tiny models) and added after it (the real ``Salesforce/blip-image-captioning-base``).
"""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from imageq.api_client.errors import ImageqError, InvalidInput
from imageq.api_client.inputs import VocabularyOptions
from imageq.api_client.settings import Settings
from imageq.workers.io.storage import LocalStorage
from imageq.workers.testing.tiny import tiny_vocabulary
from imageq.workers.training.vocabulary import (
    check_captions,
    fetch_tokenizer,
    load_replacement,
    plan_vocabulary,
    replacement_ids,
    round_trip,
    writing_problem,
)
from imageq.workers.training.wordpiece import bpe_merges, extend_tokenizer, missing_pieces

FRENCH = ["un chat noir sur un canapé", "l'été à Noël"]
JAPANESE = ["黒い猫", "白い犬が雪の中にいる。", "黒い犬"]


def blip_like(*, dec_after_vocab: bool = False) -> Any:
    from transformers import BertTokenizer

    vocab = [t for t in tiny_vocabulary() if not (dec_after_vocab and t in ("[DEC]", "[ENC]"))]
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def captions(texts: list[str]) -> list[tuple[str, str]]:
    return [(f"{i}.png", text) for i, text in enumerate(texts)]


def plan(texts: list[str], language: str | None, strategy: str | None = None, **kw: Any) -> Any:
    options = VocabularyOptions.model_validate(strategy) if strategy else None
    return plan_vocabulary(
        blip_like(),
        captions(texts),
        language=language,
        options=options,
        base_ids=(5, 3, 0),
        max_tokens=kw.pop("max_tokens", 64),
        **kw,
    )


def test_blips_vocabulary_loses_accents_case_and_japanese() -> None:
    base = blip_like()
    assert round_trip(base, "un chat noir sur un canapé")[1] == "un chat noir sur un canape"
    assert round_trip(base, "Un chat")[1] == "un chat"
    assert writing_problem(base, "黒い猫", exact=False, max_tokens=64) == "'黒' becomes [UNK]"
    problem = writing_problem(base, "un canapé", exact=True, max_tokens=64)
    assert problem == 'it comes back as "un canape"'


@pytest.mark.parametrize("dec_after_vocab", [False, True])
def test_extend_adds_exactly_the_missing_pieces(dec_after_vocab: bool) -> None:
    base = blip_like(dec_after_vocab=dec_after_vocab)
    tokenizer, added, folding = extend_tokenizer(base, FRENCH, max_subwords=0)
    # Each character the base cannot write, in the form it is needed, in order of need.
    assert added == ["##é", "##'", "à", "N", "##ë"]
    # "Noël" needs case, "é" needs accents: both foldings go off.
    assert folding == {"lowercase": False, "strip_accents": False}
    first = len(base)
    assert tokenizer.convert_tokens_to_ids(added) == list(range(first, first + 5))
    assert len(tokenizer) == first + 5
    # Every base token keeps its id, [DEC] and [ENC] included.
    assert all(tokenizer.convert_tokens_to_ids(t) == i for t, i in base.get_vocab().items())
    assert tokenizer.bos_token_id == base.bos_token_id
    for text in FRENCH:
        ids, back = round_trip(tokenizer, text)
        assert back == text and tokenizer.unk_token_id not in ids
    assert tokenizer.tokenize("l'été") == ["l", "##'", "##é", "##t", "##é"]


def test_missing_pieces_are_word_initial_or_inside_a_word() -> None:
    vocab = {"a": 0, "##b": 1}
    assert missing_pieces(["ab", "ba", "aéb", "é"], vocab, "##") == ["b", "##a", "##é", "é"]


def test_frequent_subwords_join_the_characters_most_frequent_first() -> None:
    texts = ["un canapé rouge", "le canapé bleu", "un canapé", "un café", "le café"]
    tokenizer, added, folding = extend_tokenizer(blip_like(), texts, max_subwords=1000)
    assert added[0] == "##é" and {"canapé", "café"} <= set(added)
    assert folding == {"lowercase": True, "strip_accents": False}
    assert "canapé" in tokenizer.tokenize("un canapé rouge")
    # Only what the base cannot spell: "un", "rouge" and "le" stay base pieces.
    assert not {"un", "le", "rouge"} & set(added)
    _, one, _ = extend_tokenizer(blip_like(), texts, max_subwords=1)
    assert one == ["##é", "canapé"]


def test_japanese_comes_back_without_spaces() -> None:
    tokenizer, added, _ = extend_tokenizer(blip_like(), JAPANESE, max_subwords=1000)
    # Each character, then "い犬" (twice in the words, and first of its ties).
    assert {"黒", "##い", "##猫", "白", "##。"} <= set(added) and "##い犬" in added
    assert tokenizer.tokenize("黒い犬") == ["黒", "##い犬"]
    assert tokenizer.tokenize("黒い猫") == ["黒", "##い", "##猫"]
    for text in JAPANESE:
        assert round_trip(tokenizer, text)[1] == text


def test_the_default_strategy_follows_what_the_base_can_write() -> None:
    assert plan(["a cat on a bed"], None).strategy == "base"
    # Lossless in the base vocabulary: no new tokenizer, whatever the language.
    assert plan(["un chat noir"], "fr").strategy == "base"
    extend = plan(FRENCH, "fr")
    assert extend.strategy == "extend" and extend.carries_tokenizer
    assert extend.info() == {
        "strategy": "extend",
        "tokens": extend.base_rows + 5,
        "base_rows": extend.base_rows,
        "added": 5,
        "lowercase": False,
        "strip_accents": False,
    }
    # English is BLIP's own: its folding is its convention.
    assert plan(["A Red Bus"], "en-GB").strategy == "base"
    # An explicit base accepts BLIP's folding too.
    assert plan(FRENCH[:1], "fr", "base").strategy == "base"


def test_text_the_base_cannot_write_is_refused_once_a_language_is_named() -> None:
    # A job without a language trains as it always did, and says so.
    legacy = plan(["a cat", "黒い猫"], None)
    assert legacy.strategy == "base" and legacy.info()["captions_with_unknown_tokens"] == 1
    with pytest.raises(InvalidInput) as caught:
        plan(["a cat", "黒い猫"], "en")
    assert caught.value.message == (
        'input.dataset: caption 1 "黒い猫" (1.png) cannot be written by the base tokenizer: '
        "'黒' becomes [UNK]; use the \"extend\" vocabulary"
    )


def test_a_caption_longer_than_the_decoder_takes_is_refused() -> None:
    with pytest.raises(
        InvalidInput, match=r"caption 0 .* takes \d+ tokens, more than the 4 a caption"
    ):
        plan(["un chat noir sur un canapé"], "fr", max_tokens=4)


@pytest.fixture
def bert_tokenizer_folder(tmp_path: Path) -> Path:
    """A cased BERT tokenizer that knows a few kanji and kana (mBERT in miniature)."""
    from transformers import BertTokenizer

    vocab = [*tiny_vocabulary(), "黒", "い", "猫", "##い", "Un", "##é", "canap"]
    folder = tmp_path / "mbert"
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=False)
    tokenizer.save_pretrained(folder)
    return folder


def test_replace_checks_the_round_trip_with_the_given_tokenizer(
    bert_tokenizer_folder: Path,
) -> None:
    tokenizer = load_replacement(bert_tokenizer_folder)
    assert replacement_ids(tokenizer) == (2, 3, 0)  # [CLS] starts, [SEP] ends, [PAD]
    assert round_trip(tokenizer, "Un canapé")[1] == "Un canapé"
    replace = plan(["Un canapé"], "fr", replacement=bert_tokenizer_folder, strategy=None)
    assert replace.strategy == "extend"  # the default: a replacement is only ever asked for
    options = {"strategy": "replace", "tokenizer": "file:///t/"}
    replace = plan_vocabulary(
        blip_like(),
        captions(["Un canapé"]),
        language="fr",
        options=VocabularyOptions.model_validate(options),
        base_ids=(5, 3, 0),
        max_tokens=64,
        replacement=bert_tokenizer_folder,
    )
    assert (replace.strategy, replace.base_rows, replace.bos_token_id) == ("replace", 0, 2)
    # BERT's pre-tokenizer splits kanji apart and its decoder joins words with spaces.
    with pytest.raises(InvalidInput) as caught:
        check_captions(
            tokenizer, captions(["Un canapé", "黒い猫"]), "replace", exact=True, max_tokens=64
        )
    assert caught.value.message == (
        'input.dataset: caption 1 "黒い猫" (1.png) cannot be written by the replace '
        'tokenizer: it comes back as "黒 い 猫"'
    )


def test_the_tokenizer_folder_is_fetched_like_a_dataset(
    bert_tokenizer_folder: Path, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path / "storage")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for path in bert_tokenizer_folder.iterdir():
            archive.write(path, f"mbert/{path.name}")
    storage.put("tokenizers/mbert.zip", buf.getvalue(), "application/zip")
    settings = Settings(storage_url=storage.uri("x")[:-2])
    found = fetch_tokenizer(storage.uri("tokenizers/mbert.zip"), tmp_path / "t", settings, storage)
    assert found == tmp_path / "t" / "mbert" and (found / "tokenizer.json").is_file()
    with pytest.raises(
        ImageqError, match=r"^input_fetch_failed: input\.vocabulary\.tokenizer: .*no object"
    ):
        fetch_tokenizer(storage.uri("tokenizers/none.zip"), tmp_path / "u", settings, storage)


def test_bpe_breaks_ties_alphabetically() -> None:
    # tokenizers' own trainer breaks ties in no fixed order; a resumed job must rebuild
    # the same vocabulary.
    words = Counter({"xyz": 2, "abc": 2, "q": 5})
    assert bpe_merges(words, "##") == ["##bc", "##yz", "abc", "xyz"]
