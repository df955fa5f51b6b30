"""MatchPredictor on a tiny random BLIP-ITM: scores equal the model's own forward."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from PIL import Image

from imageq.api_client.errors import ModelError, OutOfMemory
from imageq.workers.predictors.match import MatchItem, MatchPredictor, MatchResult
from imageq.workers.runtime.batching import Batcher

TEXTS = [
    "a dog on the grass",
    "two men riding bikes near a tree in the park",
    "a cat",
    "a red bus parked on the street next to a tall building",
]


def _images(n: int, seed: int = 1) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (30 + 5 * i, 60 - 4 * i, 3), dtype=np.uint8))
        for i in range(n)
    ]


IMAGES = _images(5)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def predictor(tiny_match_model: Path) -> MatchPredictor:
    p = MatchPredictor(str(tiny_match_model))
    p.setup("cpu")
    return p


def _reference(
    p: MatchPredictor, image: Image.Image, texts: list[str]
) -> tuple[list[float], list[float]]:
    """ITM probabilities and ITC cosines from ``BlipForImageTextRetrieval.forward``."""
    itm, cosine = [], []
    with torch.inference_mode():
        for text in texts:
            inputs = p.processor(images=[image], text=[text], return_tensors="pt")
            args = {
                "input_ids": inputs["input_ids"],
                "pixel_values": inputs["pixel_values"],
                "attention_mask": inputs["attention_mask"],
            }
            logits = p.model(**args, use_itm_head=True).itm_score
            itm.append(float(torch.softmax(logits, dim=-1)[0, 1]))
            cosine.append(float(p.model(**args, use_itm_head=False).itm_score[0, 0]))
    return itm, cosine


def test_scores_have_one_entry_per_text_and_valid_ranges(predictor: MatchPredictor) -> None:
    results = predictor.predict([MatchItem(IMAGES[0], TEXTS), MatchItem(IMAGES[1], TEXTS[:2])])
    assert [len(r.itm) for r in results] == [4, 2]
    assert [len(r.cosine) for r in results] == [4, 2]
    for result in results:
        assert all(0.0 <= s <= 1.0 for s in result.itm)
        assert all(-1.0 <= s <= 1.0 for s in result.cosine)
        assert result.best == int(np.argmax(result.itm))
    # Scores depend on the text: random weights still tell these texts apart.
    assert len({round(s, 6) for s in results[0].itm}) == 4
    assert len({round(s, 6) for s in results[0].cosine}) == 4


def test_scores_equal_the_models_forward(predictor: MatchPredictor) -> None:
    results = predictor.predict([MatchItem(image, TEXTS) for image in IMAGES[:3]])
    for image, result in zip(IMAGES[:3], results, strict=True):
        itm, cosine = _reference(predictor, image, TEXTS)
        assert result.itm == pytest.approx(itm, abs=1e-5)
        assert result.cosine == pytest.approx(cosine, abs=1e-5)


def test_pair_scores_alone_equal_scores_in_a_batch(predictor: MatchPredictor) -> None:
    batch = predictor.predict(
        [MatchItem(IMAGES[i], TEXTS[i % 2 :] + TEXTS[: i % 2]) for i in range(len(IMAGES))]
    )
    for i, result in enumerate(batch):
        texts = TEXTS[i % 2 :] + TEXTS[: i % 2]
        for j, text in enumerate(texts):
            alone = predictor.predict([MatchItem(IMAGES[i], [text])])[0]
            assert alone.itm[0] == pytest.approx(result.itm[j], abs=1e-5)
            assert alone.cosine[0] == pytest.approx(result.cosine[j], abs=1e-5)


def test_vision_runs_once_per_batch(predictor: MatchPredictor) -> None:
    calls: list[int] = []
    handle = predictor.model.vision_model.register_forward_hook(
        lambda module, args, output: calls.append(output.last_hidden_state.shape[0])
    )
    try:
        predictor.predict([MatchItem(image, TEXTS) for image in IMAGES])
    finally:
        handle.remove()
    assert calls == [len(IMAGES)]


def test_chunked_pairs_give_the_same_scores(
    predictor: MatchPredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = [MatchItem(image, TEXTS) for image in IMAGES[:3]]
    whole = predictor.predict(items)
    passes: list[int] = []
    handle = predictor.model.itm_head.register_forward_hook(
        lambda module, args, output: passes.append(output.shape[0])
    )
    monkeypatch.setattr(predictor, "max_pairs_per_pass", 5)
    try:
        chunked = predictor.predict(items)
    finally:
        handle.remove()
    assert passes == [5, 5, 2]
    for a, b in zip(whole, chunked, strict=True):
        assert a.itm == pytest.approx(b.itm, abs=1e-5)
        assert a.cosine == pytest.approx(b.cosine, abs=1e-5)


def test_long_texts_are_truncated_to_the_tokenizer_limit(predictor: MatchPredictor) -> None:
    limit = predictor.max_text_tokens
    assert limit == min(
        predictor.processor.tokenizer.model_max_length,
        predictor.model.config.text_config.max_position_embeddings,
    )
    words = ["dog", "cat"] * limit
    long = " ".join(words)
    cut = " ".join(words[: limit - 2])  # [CLS] and [SEP] take two of the positions
    result = predictor.predict([MatchItem(IMAGES[0], [long, cut])])[0]
    assert result.itm[0] == pytest.approx(result.itm[1], abs=1e-5)
    assert result.cosine[0] == pytest.approx(result.cosine[1], abs=1e-5)


def test_repeated_texts_score_the_same(predictor: MatchPredictor) -> None:
    result = predictor.predict([MatchItem(IMAGES[2], [TEXTS[0], TEXTS[1], TEXTS[0]])])[0]
    assert result.itm[0] == result.itm[2] and result.cosine[0] == result.cosine[2]
    assert predictor.predict([]) == []


def test_best_picks_the_highest_match() -> None:
    assert MatchResult(itm=[0.1, 0.7, 0.3], cosine=[0.0, 0.0, 0.0]).best == 1


@pytest.mark.parametrize("model_dir", ["empty", "missing"])
def test_bad_model_dir_is_a_model_error(tmp_path: Path, model_dir: str) -> None:
    path = tmp_path / model_dir
    if model_dir == "empty":
        path.mkdir()
    p = MatchPredictor(str(path))
    with pytest.raises(ModelError, match="cannot load match model"):
        p.setup("cpu")
    with pytest.raises(ModelError, match="not loaded"):
        p.predict([MatchItem(IMAGES[0], TEXTS)])


def test_wrong_architecture_is_a_model_error(tiny_caption_model: Path) -> None:
    # A captioning checkpoint has no ITM head: the load or warm-up must fail loudly.
    with pytest.raises(ModelError, match="cannot load match model"):
        MatchPredictor(str(tiny_caption_model)).setup("cpu")


def test_cuda_oom_becomes_out_of_memory(
    predictor: MatchPredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def oom(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(predictor.model.text_encoder, "forward", oom)
    with pytest.raises(OutOfMemory):
        predictor.predict([MatchItem(IMAGES[0], TEXTS)])


def test_text_token_counts_before_truncation(predictor: MatchPredictor) -> None:
    limit = predictor.max_text_tokens
    counts = predictor.text_token_counts(["a dog", "\u200b", "\x00\x01", "a " * (limit + 5)])
    # Zero-width and control characters vanish in the tokenizer: such a text is empty.
    assert counts == [2, 0, 0, limit + 5]
    assert predictor.text_token_counts([]) == []
    with pytest.raises(ModelError, match="not loaded"):
        MatchPredictor("unused").text_token_counts(["a dog"])


def test_batcher_fails_only_the_bad_item(predictor: MatchPredictor) -> None:
    """One broken item in a micro-batch: the batch reruns item by item, the rest succeed."""
    batcher = Batcher(predictor, max_batch=8, max_wait_ms=200)
    batcher.start()
    try:
        broken = MatchItem(cast(Image.Image, object()), TEXTS[:2])
        items = [MatchItem(IMAGES[0], TEXTS[:2]), broken, MatchItem(IMAGES[1], TEXTS[:2])]
        futures = batcher.submit(items)
        good = [futures[0].result(30), futures[2].result(30)]
        with pytest.raises(ModelError, match="match"):
            futures[1].result(30)
    finally:
        batcher.stop()
    alone = predictor.predict([items[0], items[2]])
    for ran, expected in zip(good, alone, strict=True):
        # Rerun alone after the batch failed, with the same scores.
        assert ran.batch_size == 1
        assert ran.result.itm == pytest.approx(expected.itm, abs=1e-5)
        assert ran.result.cosine == pytest.approx(expected.cosine, abs=1e-5)
