"""Caption and match ``resize`` (stretch, center_crop, letterbox) with attention mapped back
onto the photo, seeded sampling, and attention maps for every returned sequence."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from imageq.api_client.inputs import CaptionInput, GenerationOptions, MatchInput, Resize
from imageq.workers.io.storage import LocalStorage
from imageq.workers.kinds.caption import CaptionBatcher, CaptionHandler
from imageq.workers.predictors.attention import overlay_png
from imageq.workers.predictors.caption import CaptionItem, CaptionPredictor
from imageq.workers.predictors.framing import Frame, framed
from tests.unit.test_job_images import JOB, Control, context

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SAMPLED = GenerationOptions(max_new_tokens=10, do_sample=True, top_k=0, temperature=1.5)


@pytest.fixture(scope="module")
def predictor(tiny_caption_model: Path) -> CaptionPredictor:
    p = CaptionPredictor(str(tiny_caption_model))
    p.setup("cpu")
    return p


def panorama() -> Image.Image:
    """A 4:1 image of four coloured quarters: red, green, blue, white."""
    image = Image.new("RGB", (400, 100))
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]):
        image.paste(colour, (100 * i, 0, 100 * (i + 1), 100))
    return image


def noise(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))


# -- the contract ----------------------------------------------------------------------------


def test_resize_and_seed_are_in_the_contract() -> None:
    assert CaptionInput(image="s3://b/k.png").resize is None  # the processor's own
    assert CaptionInput(image="s3://b/k.png", resize="letterbox").resize is Resize.LETTERBOX
    match = MatchInput(image="s3://b/k.png", texts=["a"], resize="center_crop")
    assert match.resize is Resize.CENTER_CROP
    with pytest.raises(ValidationError):
        CaptionInput(image="s3://b/k.png", resize="squash")
    assert GenerationOptions().seed is None and GenerationOptions(seed=7).seed == 7
    with pytest.raises(ValidationError):
        GenerationOptions(seed=-1)


# -- resize ------------------------------------------------------------------------------------


def test_center_crop_and_letterbox_keep_the_panorama_in_shape(predictor: CaptionPredictor) -> None:
    image = panorama()
    stretched, frame = predictor.prepare(image)
    assert frame == Frame(Resize.STRETCH) and torch.equal(stretched, predictor.preprocess(image))
    assert predictor.input_size == (48, 48)
    crop, crop_frame = predictor.prepare(image, Resize.CENTER_CROP)
    # The centre 100 x 100: half green, half blue; no red or white is seen.
    assert crop_frame.box == (-1.5, 0.0, 2.5, 1.0)
    centre = image.crop((150, 0, 250, 100))
    assert torch.equal(crop, predictor.preprocess(centre))
    letterbox, box_frame = predictor.prepare(image, Resize.LETTERBOX)
    assert box_frame.box == (0.0, 0.375, 1.0, 0.625)
    # Padded with the processor's mean colour: normalised, the padding is (almost) zero.
    assert letterbox[:, :16].abs().max() < 0.02 and letterbox[:, -16:].abs().max() < 0.02
    # The content band keeps all four colours, side by side.
    band = letterbox[:, 24]
    assert band[0, 5] > 1 and band[1, 18] > 1 and band[2, 30] > 1 and band[:, 43].min() > 1
    # Every mode gives the encoder the same size: they share batches.
    assert stretched.shape == crop.shape == letterbox.shape
    items = [CaptionItem(image, resize=mode) for mode in (None, *Resize)]
    assert len({predictor.batch_key(item) for item in items}) == 1


def test_a_tall_image_is_cropped_and_padded_the_other_way() -> None:
    tall = Image.new("RGB", (100, 300), (10, 20, 30))
    crop, frame = framed(tall, Resize.CENTER_CROP, (48, 48), (1, 2, 3))
    assert crop.size == (100, 100) and frame.box == (0.0, -1.0, 1.0, 2.0)
    padded, frame = framed(tall, Resize.LETTERBOX, (48, 48), (1, 2, 3))
    assert padded.size == (300, 300) and padded.getpixel((0, 0)) == (1, 2, 3)
    assert padded.getpixel((150, 150)) == (10, 20, 30) and frame.box[0] == pytest.approx(1 / 3)


def _attention(predictor: CaptionPredictor, image: Image.Image, resize: Resize) -> Any:
    gen = GenerationOptions(max_new_tokens=4)
    result = predictor.predict([CaptionItem(image, None, gen, attention=True, resize=resize)])[0]
    assert result.attention is not None
    return result.attention


def test_letterbox_attention_leaves_the_padding_out(predictor: CaptionPredictor) -> None:
    payload = _attention(predictor, panorama(), Resize.LETTERBOX)
    # The image covers rows 2.25..3.75 of the 6 x 6 grid: rows 2 and 3 are kept.
    assert payload["grid"] == [2, 6]
    assert payload["frame"] == {"resize": "letterbox", "box": [0.0, 0.25, 6.0, 1.75]}
    for token in payload["tokens"]:
        assert np.array(token["mean"]).shape == (2, 6)
        assert np.array(token["mean"]).sum() == pytest.approx(1, abs=1e-4)
        for layer in token["layers"]:
            assert np.array(layer).sum() == pytest.approx(1, abs=1e-4)


def test_center_crop_attention_covers_only_the_crop(predictor: CaptionPredictor) -> None:
    image = panorama()
    payload = _attention(predictor, image, Resize.CENTER_CROP)
    assert payload["grid"] == [6, 6]
    assert payload["frame"] == {"resize": "center_crop", "box": [-9.0, 0.0, 15.0, 6.0]}
    sheet = Image.open(io.BytesIO(overlay_png(image, payload, columns=1)))
    panel = np.asarray(sheet.crop((0, 0, 400, 100)), dtype=int)
    # Outside the crop (the red and white quarters, bar the interpolation's edge) the
    # panel is the muted photo alone: grey, no heat colour.
    outside = np.concatenate([panel[10:, :140], panel[10:, 260:]], axis=1)
    assert (outside.max(axis=-1) - outside.min(axis=-1)).max() == 0
    inside = panel[10:, 160:240]
    assert (inside.max(axis=-1) - inside.min(axis=-1)).max() > 30


def test_letterbox_overlay_spreads_the_grid_over_the_image_alone(
    predictor: CaptionPredictor,
) -> None:
    image = panorama()
    payload = _attention(predictor, image, Resize.LETTERBOX)
    payload["tokens"] = payload["tokens"][:1]
    # A grid whose only heat is its top-left cell: on the photo it is the top-left
    # sixth of the width and (the box starts a quarter cell down) most of the top half.
    hot = [[0.0] * 6 for _ in range(2)]
    hot[0][0] = 1.0
    payload["tokens"][0]["mean"] = hot
    panel = np.asarray(Image.open(io.BytesIO(overlay_png(image, payload))), dtype=int)
    colour = panel.max(axis=-1) - panel.min(axis=-1)
    # Heat at the photo's top-left corner (below the token's label).
    assert colour[25:45, 5:45].min() > 30
    assert colour[70:, 200:].max() == 0  # none at the bottom right


# -- seeds -------------------------------------------------------------------------------------


def test_a_seeded_sample_is_the_same_alone_or_in_a_batch(predictor: CaptionPredictor) -> None:
    seven = SAMPLED.model_copy(update={"seed": 7})
    torch.manual_seed(123)
    alone = predictor.predict([CaptionItem(noise(0), None, seven)])[0].texts
    torch.manual_seed(999)
    batch = [
        CaptionItem(noise(1), None, seven),
        CaptionItem(noise(0), None, seven),
        CaptionItem(noise(2), None, SAMPLED),
        CaptionItem(noise(0), None, seven),
    ]
    results = predictor.predict(batch)
    assert results[1].texts == alone and results[3].texts == alone
    other = SAMPLED.model_copy(update={"seed": 8})
    assert predictor.predict([CaptionItem(noise(0), None, other)])[0].texts != alone
    # Sampled without a seed: draws differ from call to call.
    unseeded = {predictor.predict([CaptionItem(noise(0), None, SAMPLED)])[0].text for _ in range(4)}
    assert len(unseeded) > 1


def test_seeds_split_only_sampled_batches(
    predictor: CaptionPredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    greedy = [CaptionItem(noise(i), None, GenerationOptions(seed=i)) for i in range(3)]
    assert len({predictor.batch_key(item) for item in greedy}) == 1
    calls: list[int] = []
    generate = predictor.model.text_decoder.generate

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    monkeypatch.setattr(predictor.model.text_decoder, "generate", spy)
    predictor.predict([CaptionItem(noise(i), None, SAMPLED) for i in range(3)])
    assert calls == [3]  # unseeded sampling still batches
    calls.clear()
    seeded = SAMPLED.model_copy(update={"seed": 1})
    predictor.predict([CaptionItem(noise(i), None, seeded) for i in range(3)])
    assert calls == [1, 1, 1]


# -- every returned sequence ---------------------------------------------------------------------


def test_every_returned_sequence_has_its_attention(predictor: CaptionPredictor) -> None:
    gen = GenerationOptions(max_new_tokens=5, num_beams=3, num_return_sequences=3)
    items = [CaptionItem(noise(i), None, gen, attention=True) for i in range(2)]
    results = predictor.predict(items)
    for item, result in zip(items, results, strict=True):
        assert len(result.attentions) == 3 and result.attention is result.attentions[0]
        assert [p["text"] for p in result.attentions] == result.texts
        for text, payload in zip(result.texts, result.attentions, strict=True):
            tokens = predictor.processor.tokenizer.tokenize(text)
            assert [t["token"] for t in payload["tokens"]] == tokens
        # Sequence j's maps are those of that sequence scored alone.
        alone = predictor.predict(
            [CaptionItem(item.image, None, GenerationOptions(max_new_tokens=5), attention=True)]
        )[0]
        if alone.texts[0] == result.texts[1]:
            assert alone.attentions[0]["tokens"] == result.attentions[1]["tokens"]
    assert len({tuple(r.texts) for r in results}) == 2


def test_the_handler_stores_maps_for_every_sequence(
    predictor: CaptionPredictor, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path / "storage")
    buffer = io.BytesIO()
    panorama().save(buffer, "PNG")
    storage.put("uploads/p.png", buffer.getvalue(), "image/png")
    batcher = CaptionBatcher(predictor, max_batch=4, max_wait_ms=1)
    batcher.start()
    try:
        handler = CaptionHandler(
            context(storage), batcher, prepare=predictor.prepare, input_side=48
        )
        gen = GenerationOptions(max_new_tokens=4, num_beams=2, num_return_sequences=2)
        inp = CaptionInput(
            images=["storage://uploads/p.png"], attention=True, generation=gen, resize="letterbox"
        )
        out = handler.handle(JOB, inp, Control())
    finally:
        batcher.stop()
    caption = out["captions"][0]
    assert len(caption["texts"]) == 2 and len(caption["attentions"]) == 2
    assert caption["attention"] == caption["attentions"][0]
    assert caption["attention"]["frame"]["resize"] == "letterbox"
    assert caption["attention"]["grid"] == [2, 6]
    for name in ("attention-0.json", "attention-0.png", "attention-0-1.json", "attention-0-1.png"):
        assert storage.exists(f"jobs/j1/{name}")
    # The overlay's panels are the photo's shape, not the padded square's.
    assert caption["attention"]["panel"] == [400, 100]


def test_match_jobs_take_resize_on_the_job_thread(
    tiny_match_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imageq.workers.kinds.match import MatchBatcher, MatchHandler
    from imageq.workers.predictors.match import MatchPredictor

    matcher = MatchPredictor(str(tiny_match_model))
    matcher.setup("cpu")
    image = panorama()
    centre = image.crop((150, 0, 250, 100))
    assert torch.equal(matcher.preprocess(image, Resize.CENTER_CROP), matcher.preprocess(centre))
    storage = LocalStorage(tmp_path / "storage")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    storage.put("uploads/p.png", buffer.getvalue(), "image/png")
    modes: list[Resize | None] = []
    preprocess = matcher.preprocess

    def spy(picture: Image.Image, resize: Resize | None = None) -> torch.Tensor:
        modes.append(resize)
        return preprocess(picture, resize)

    monkeypatch.setattr(matcher, "preprocess", spy)
    batcher = MatchBatcher(matcher, max_batch=4, max_wait_ms=1)
    batcher.start()
    try:
        handler = MatchHandler(context(storage), matcher, batcher)
        scores = {}
        for mode in (None, "letterbox"):
            inp = MatchInput(images=["storage://uploads/p.png"], texts=["a red car"], resize=mode)
            scores[mode] = handler.handle(JOB, inp, Control())["scores"][0]["itm"]
    finally:
        batcher.stop()
    assert modes == [None, Resize.LETTERBOX]
    assert scores[None] != scores["letterbox"]
