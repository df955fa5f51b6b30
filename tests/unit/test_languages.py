"""Language tags (BCP 47), the inputs that carry them (caption jobs and fine-tunes), and
how a caption job's language picks an adapter from the registry."""

from __future__ import annotations

from typing import Any, cast

import pytest
from pydantic import ValidationError

from imageq.api_client.errors import InvalidInput
from imageq.api_client.inputs import CaptionInput, FinetuneInput
from imageq.api_client.languages import best_matches, language_tag, match_rank


@pytest.mark.parametrize(
    "raw, canonical",
    [
        ("fr", "fr"),
        ("FR-ca", "fr-CA"),
        ("ja_JP", "ja-JP"),
        ("zh-hant-tw", "zh-Hant-TW"),
        ("sr-latn-rs", "sr-Latn-RS"),
        ("es-419", "es-419"),
        ("de-CH-1901", "de-CH-1901"),
        ("en-US-x-twain", "en-US-x-twain"),
        ("x-klingon", "x-klingon"),
        ("yue", "yue"),
    ],
)
def test_well_formed_tags_take_their_canonical_case(raw: str, canonical: str) -> None:
    assert language_tag(raw) == canonical


@pytest.mark.parametrize(
    "raw", ["", "f", "french!", "fr-", "en--us", "i-klingon", "de-1901-1901", "123", "a" * 70]
)
def test_malformed_tags_are_refused(raw: str) -> None:
    with pytest.raises(ValueError):
        language_tag(raw)


def test_matching_prefers_the_same_tag_then_a_shorter_then_a_longer_one() -> None:
    assert match_rank("fr", "fr") == 0
    assert match_rank("fr-CA", "fr") == 1
    assert match_rank("fr", "fr-CA") == 2
    assert match_rank("fr", "fy") is None and match_rank("fr", "fra") is None
    assert best_matches("fr-CA", ["fr", "fr-CA", "fr-FR"]) == ["fr-CA"]
    assert best_matches("fr-BE", ["fr-CA", "fr"]) == ["fr"]
    assert sorted(best_matches("fr", ["fr-CA", "fr-FR", "ja"])) == ["fr-CA", "fr-FR"]
    assert best_matches("de", ["fr", "ja"]) == []


def test_caption_input_takes_a_language() -> None:
    inp = CaptionInput.model_validate({"image": "https://x/y.png", "language": "JA-jp"})
    assert inp.language == "ja-JP" and inp.adapter is None
    with pytest.raises(ValidationError, match="BCP 47"):
        CaptionInput.model_validate({"image": "https://x/y.png", "language": "japanese!"})


def test_finetune_input_language_and_vocabulary() -> None:
    base = {"target": "caption", "dataset": "s3://b/d.zip", "name": "blip-fr"}
    inp = FinetuneInput.model_validate({**base, "language": "fr", "vocabulary": "extend"})
    assert inp.language == "fr" and inp.vocabulary is not None
    assert (inp.vocabulary.strategy, inp.vocabulary.tokenizer) == ("extend", None)
    replace = {"strategy": "replace", "tokenizer": "s3://b/mbert/"}
    inp = FinetuneInput.model_validate({**base, "vocabulary": replace})
    assert inp.vocabulary is not None and inp.vocabulary.tokenizer == "s3://b/mbert/"
    assert FinetuneInput.model_validate(base).vocabulary is None
    cases: list[tuple[dict[str, Any], str]] = [
        ({"vocabulary": "replace"}, "tokenizer"),
        ({"vocabulary": {"strategy": "extend", "tokenizer": "s3://b/t/"}}, "tokenizer"),
        ({"vocabulary": "grow"}, "strategy"),
        ({"language": "fr", "target": "diffusion"}, "caption fine-tunes only"),
        ({"vocabulary": {"strategy": "extend", "max_subwords": -1}}, "max_subwords"),
    ]
    for bad, problem in cases:
        with pytest.raises(ValidationError, match=problem):
            FinetuneInput.model_validate({**base, **bad})


class _Registry:
    """The adapter registry's reading side, in memory."""

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self._entries = {e["name"]: e for e in entries}

    def entries(self, tenant: str | None = None) -> list[dict[str, Any]]:
        return list(self._entries.values())

    def get(self, name: str, tenant: str | None = None) -> dict[str, Any] | None:
        return self._entries.get(name)


def test_a_language_picks_the_newest_caption_adapter_that_writes_it() -> None:
    from imageq.workers.kinds.caption import CaptionAdapters

    registry = _Registry(
        [
            {"name": "fr-old", "target": "caption", "language": "fr", "version": "2026-01-01"},
            {"name": "fr-new", "target": "caption", "language": "fr", "version": "2026-02-01"},
            {"name": "fr-ca", "target": "caption", "language": "fr-CA", "version": "2026-03-01"},
            {"name": "ja", "target": "caption", "language": "ja", "version": "2026-01-01"},
            {"name": "sd-fr", "target": "diffusion", "language": "de", "version": "2026-04-01"},
            {"name": "plain", "target": "caption", "version": "2026-05-01"},
        ]
    )
    # Choosing loads nothing: no predictor needed.
    adapters = CaptionAdapters(cast(Any, registry), cast(Any, None))
    assert adapters.for_language("fr") == "fr-new"
    assert adapters.for_language("fr-CA") == "fr-ca"
    assert adapters.for_language("fr-BE") == "fr-new"
    assert adapters.for_language("ja-JP") == "ja"
    assert adapters.for_language("en-GB") is None  # the base model writes English
    with pytest.raises(InvalidInput) as caught:
        adapters.for_language("de")
    assert caught.value.message == (
        "input.language: no caption adapter writes 'de'; languages available: fr, fr-CA, ja "
        "(and 'en', the base model's)"
    )
    adapters.check_language("fr-ca", "fr")
    with pytest.raises(InvalidInput, match="adapter 'ja' writes ja, not 'fr'"):
        adapters.check_language("ja", "fr")
    with pytest.raises(InvalidInput, match="writes no declared language"):
        adapters.check_language("plain", "fr")
