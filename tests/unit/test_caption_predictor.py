"""CaptionPredictor on a tiny random BLIP: batching, decoding options, attention, adapters."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from imageq.api_client.errors import InvalidInput, ModelError, OutOfMemory
from imageq.api_client.inputs import GenerationOptions
from imageq.workers.predictors.attention import patch_grid
from imageq.workers.predictors.caption import (
    CaptionItem,
    CaptionPredictor,
    CaptionResult,
    overlay_png,
)
from imageq.workers.testing import tiny


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 50 + 2 * i, 3), dtype=np.uint8))
        for i in range(n)
    ]


IMAGES = _images(8)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def predictor(tiny_caption_model: Path) -> CaptionPredictor:
    p = CaptionPredictor(str(tiny_caption_model))
    p.setup("cpu")
    return p


def _one(
    p: CaptionPredictor, image: Image.Image, prompt: str | None = None, **options: object
) -> CaptionResult:
    gen = GenerationOptions.model_validate(options)
    return p.predict([CaptionItem(image, prompt, gen)])[0]


def _tokens(p: CaptionPredictor, text: str) -> list[str]:
    tokens: list[str] = p.processor.tokenizer.tokenize(text)
    return tokens


# -- building and loading ----------------------------------------------------------------


def test_tiny_builder_is_deterministic_per_seed(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    a = load_file(tiny.build_tiny_caption(tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(tiny.build_tiny_caption(tmp_path / "b", seed=3) / "model.safetensors")
    c = load_file(tiny.build_tiny_caption(tmp_path / "c", seed=4) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tiny_token_ids_line_up(predictor: CaptionPredictor) -> None:
    text_config = predictor.model.config.text_config
    tokenizer = predictor.processor.tokenizer
    assert (
        text_config.bos_token_id
        == tokenizer.bos_token_id
        == tokenizer.convert_tokens_to_ids("[DEC]")
    )
    assert text_config.sep_token_id == tokenizer.sep_token_id
    assert text_config.pad_token_id == tokenizer.pad_token_id
    assert text_config.vocab_size == len(tokenizer)
    # Captions decode to vocabulary words, not [UNK]s.
    assert tokenizer.tokenize("a dog on the grass") == ["a", "dog", "on", "the", "grass"]


def test_blip_base_config_is_full_size() -> None:
    config = tiny.blip_base_caption_config()
    text: Any = config.text_config
    vision: Any = config.vision_config
    assert text.vocab_size == 30524
    assert text.hidden_size == vision.hidden_size == 768
    assert text.num_hidden_layers == vision.num_hidden_layers == 12
    assert text.bos_token_id == 30522
    assert patch_grid(vision) == (24, 24)


@pytest.mark.parametrize("model_dir", ["empty", "missing"])
def test_bad_model_dir_is_a_model_error(tmp_path: Path, model_dir: str) -> None:
    path = tmp_path / model_dir
    if model_dir == "empty":
        path.mkdir()
    p = CaptionPredictor(str(path))
    with pytest.raises(ModelError, match="cannot load caption model"):
        p.setup("cpu")
    with pytest.raises(ModelError, match="not loaded"):
        p.predict([CaptionItem(IMAGES[0])])


def test_setup_resolves_auto_to_cpu_without_cuda(tiny_caption_model: Path) -> None:
    p = CaptionPredictor(str(tiny_caption_model))
    p.setup("auto")
    assert p.device == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert p.model.training is False


# -- greedy decoding and batching ----------------------------------------------------------


def test_greedy_matches_blip_generate(predictor: CaptionPredictor) -> None:
    for prompt in (None, "a photography of"):
        texts = [_one(predictor, im, prompt, max_new_tokens=10).text for im in IMAGES[:3]]
        inputs = predictor.processor(
            images=IMAGES[:3], text=[prompt] * 3 if prompt else None, return_tensors="pt"
        )
        expected = predictor.processor.batch_decode(
            predictor.model.generate(**inputs, max_new_tokens=10), skip_special_tokens=True
        )
        assert texts == [t.strip() for t in expected]
        if prompt:
            assert all(t.startswith(prompt + " ") for t in texts)


@pytest.mark.parametrize(
    "prompt,options",
    [(None, {}), ("a picture of", {}), (None, {"num_beams": 3})],
)
def test_same_caption_alone_or_in_a_batch_of_8(
    predictor: CaptionPredictor, prompt: str | None, options: dict[str, Any]
) -> None:
    gen = GenerationOptions(max_new_tokens=12, **options)
    batch = predictor.predict([CaptionItem(im, prompt, gen) for im in IMAGES])
    alone = [predictor.predict([CaptionItem(im, prompt, gen)])[0] for im in IMAGES]
    assert [r.texts for r in batch] == [r.texts for r in alone]
    # The images matter: random inputs do not all collapse onto one caption.
    assert len({r.text for r in batch}) > 1


def test_max_new_tokens_bounds_greedy_and_keeps_its_prefix(predictor: CaptionPredictor) -> None:
    long = _tokens(predictor, _one(predictor, IMAGES[0], max_new_tokens=12).text)
    short = _tokens(predictor, _one(predictor, IMAGES[0], max_new_tokens=4).text)
    assert 0 < len(short) <= 4 < len(long) <= 12
    assert long[: len(short)] == short


def test_min_new_tokens_holds_back_the_end_token(tiny_caption_model: Path) -> None:
    p = CaptionPredictor(str(tiny_caption_model))
    p.setup("cpu")
    sep = p.model.config.text_config.sep_token_id
    with torch.no_grad():
        # Make [SEP] by far the likeliest next token: only min_new_tokens can delay it.
        p.model.text_decoder.cls.predictions.bias[sep] += 50.0
    assert _one(p, IMAGES[0], max_new_tokens=8).text == ""
    assert len(_tokens(p, _one(p, IMAGES[0], max_new_tokens=8, min_new_tokens=4).text)) == 4


def _log_prob(p: CaptionPredictor, image: Image.Image, sequence: torch.Tensor) -> float:
    """Log-probability of generated ids (after [DEC]), with [SEP] banned as min_new_tokens does."""
    with torch.inference_mode():
        pixels = p.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        embeds = p.model.vision_model(pixel_values=pixels).last_hidden_state
        logits = p.model.text_decoder(input_ids=sequence[None], encoder_hidden_states=embeds).logits
        logits[..., p.model.config.text_config.sep_token_id] = -math.inf
        steps = logits[0, :-1].log_softmax(-1).gather(-1, sequence[1:, None])
    return float(steps.sum())


def test_beam_search_finds_captions_at_least_as_likely_as_greedy(
    predictor: CaptionPredictor,
) -> None:
    fixed: dict[str, Any] = {"max_new_tokens": 6, "min_new_tokens": 6}
    better = 0
    for image in IMAGES:
        pixels = predictor.processor(images=[image], return_tensors="pt")["pixel_values"]
        ids = {}
        for beams in (1, 4):
            ids[beams] = predictor.model.generate(pixel_values=pixels, num_beams=beams, **fixed)[0]
            ours = _one(predictor, image, num_beams=beams, **fixed).text
            assert ours == predictor.processor.decode(ids[beams], skip_special_tokens=True).strip()
            assert len(ids[beams]) == 1 + 6
        greedy, beam = _log_prob(predictor, image, ids[1]), _log_prob(predictor, image, ids[4])
        assert beam >= greedy - 1e-4
        better += beam > greedy + 1e-4
    assert better > 0, "beam search never beat greedy: it is not searching"


def test_num_return_sequences_groups_beams_per_image(predictor: CaptionPredictor) -> None:
    gen = GenerationOptions(max_new_tokens=8, num_beams=4, num_return_sequences=3)
    results = predictor.predict([CaptionItem(im, None, gen) for im in IMAGES[:3]])
    assert [len(r.texts) for r in results] == [3, 3, 3]
    for image, result in zip(IMAGES[:3], results, strict=True):
        assert len(set(result.texts)) == 3
        assert result.texts[0] == _one(predictor, image, max_new_tokens=8, num_beams=4).text


def test_sampling_draws_from_the_distribution(predictor: CaptionPredictor) -> None:
    options: dict[str, Any] = {"max_new_tokens": 10, "do_sample": True, "num_return_sequences": 4}
    torch.manual_seed(1)
    first = _one(predictor, IMAGES[0], **options).texts
    torch.manual_seed(1)
    again = _one(predictor, IMAGES[0], **options).texts
    torch.manual_seed(2)
    other = _one(predictor, IMAGES[0], **options).texts
    greedy = _one(predictor, IMAGES[0], max_new_tokens=10).text
    assert len(first) == 4 and first == again
    assert other != first
    assert len(set(first)) > 1 and any(t != greedy for t in first)
    # Sampling from the single likeliest token is greedy decoding.
    top1 = _one(predictor, IMAGES[0], max_new_tokens=10, do_sample=True, top_k=1)
    assert top1.text == greedy


def test_repetition_penalty_removes_repeats(predictor: CaptionPredictor) -> None:
    plain = [_tokens(predictor, _one(predictor, im, max_new_tokens=20).text) for im in IMAGES]
    penalised = [
        _tokens(predictor, _one(predictor, im, max_new_tokens=20, repetition_penalty=10.0).text)
        for im in IMAGES
    ]
    assert any(len(set(t)) < len(t) for t in plain)
    assert all(len(set(t)) == len(t) for t in penalised)


def test_batch_key_separates_incompatible_items(predictor: CaptionPredictor) -> None:
    base = CaptionItem(IMAGES[0], None, GenerationOptions())
    same = CaptionItem(IMAGES[1], None, GenerationOptions())
    assert predictor.batch_key(base) == predictor.batch_key(same)
    others = [
        CaptionItem(IMAGES[0], "a photo of", GenerationOptions()),
        CaptionItem(IMAGES[0], None, GenerationOptions(num_beams=2)),
        CaptionItem(IMAGES[0], None, GenerationOptions(), adapter="fr"),
        CaptionItem(IMAGES[0], None, GenerationOptions(), attention=True),
    ]
    keys = {predictor.batch_key(item) for item in [base, *others]}
    assert len(keys) == 5
    hash(predictor.batch_key(others[1]))


def test_mixed_batch_runs_each_group_and_keeps_order(predictor: CaptionPredictor) -> None:
    greedy, beams = (
        GenerationOptions(max_new_tokens=6),
        GenerationOptions(max_new_tokens=6, num_beams=3),
    )
    items = [
        CaptionItem(IMAGES[0], None, greedy),
        CaptionItem(IMAGES[1], "a photo of", greedy),
        CaptionItem(IMAGES[2], None, beams),
        CaptionItem(IMAGES[3], None, greedy),
    ]
    mixed = predictor.predict(items)
    assert [r.texts for r in mixed] == [predictor.predict([i])[0].texts for i in items]
    assert predictor.predict([]) == []


def test_prompt_longer_than_the_positions_is_invalid(predictor: CaptionPredictor) -> None:
    prompt = " ".join(["a"] * 300)
    with pytest.raises(InvalidInput, match="positions"):
        _one(predictor, IMAGES[0], prompt, max_new_tokens=256)


def test_cuda_oom_becomes_out_of_memory(
    predictor: CaptionPredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def oom(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(predictor.model.vision_model, "forward", oom)
    with pytest.raises(OutOfMemory, match="out of memory"):
        _one(predictor, IMAGES[0])

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cuDNN error")

    monkeypatch.setattr(predictor.model.vision_model, "forward", broken)
    with pytest.raises(ModelError, match="cuDNN error"):
        _one(predictor, IMAGES[0])


# -- attention ---------------------------------------------------------------------------


def test_attention_payload_shape_and_normalisation(predictor: CaptionPredictor) -> None:
    prompt = "a photo of"
    gen = GenerationOptions(max_new_tokens=7)
    plain = predictor.predict([CaptionItem(im, prompt, gen) for im in IMAGES[:2]])
    results = predictor.predict([CaptionItem(im, prompt, gen, attention=True) for im in IMAGES[:2]])
    vision = predictor.model.config.vision_config
    rows, cols = vision.image_size // vision.patch_size, vision.image_size // vision.patch_size
    n_layers = predictor.model.config.text_config.num_hidden_layers
    assert [r.texts for r in results] == [r.texts for r in plain]
    assert plain[0].attention is None
    for result in results:
        payload = result.attention
        assert payload is not None
        json.dumps(payload)
        assert payload["grid"] == [rows, cols] == [6, 6]
        generated = result.text[len(prompt) :].strip()
        assert [t["token"] for t in payload["tokens"]] == _tokens(predictor, generated)
        assert len(payload["tokens"]) > 0
        for token in payload["tokens"]:
            mean = np.array(token["mean"])
            layers = np.array(token["layers"])
            assert mean.shape == (rows, cols) and layers.shape == (n_layers, rows, cols)
            assert (mean >= 0).all() and (layers >= 0).all()
            assert mean.sum() == pytest.approx(1.0, abs=1e-4)
            assert layers.sum(axis=(1, 2)) == pytest.approx(np.ones(n_layers), abs=1e-4)
            average = layers.mean(axis=0)
            assert mean == pytest.approx(average / average.sum(), abs=1e-5)
    # Different images draw the decoder's attention to different places.
    first = [np.array(r.attention["tokens"][0]["mean"]) for r in results if r.attention]
    assert not np.allclose(first[0], first[1])


def test_attention_rows_match_an_independent_forward(predictor: CaptionPredictor) -> None:
    """Token j's grid is the cross-attention of the step that predicted it (query j - 1)."""
    result = predictor.predict(
        [CaptionItem(IMAGES[4], None, GenerationOptions(max_new_tokens=5), attention=True)]
    )[0]
    assert result.attention is not None
    ids = (
        predictor._prompt_ids(None)
        + predictor.processor.tokenizer(result.text, add_special_tokens=False)["input_ids"]
    )
    with torch.inference_mode():
        pixels = predictor.processor.image_processor(images=[IMAGES[4]], return_tensors="pt")[
            "pixel_values"
        ]
        out = predictor.model(
            pixel_values=pixels, input_ids=torch.tensor([ids]), output_attentions=True
        )
        embeds = out.image_embeds
        decoder = predictor.model.text_decoder(
            input_ids=torch.tensor([ids]), encoder_hidden_states=embeds, output_attentions=True
        )
    last_layer = decoder.cross_attentions[-1][0].mean(dim=0)[:, 1:]
    for j, token in enumerate(result.attention["tokens"], start=1):
        expected = (last_layer[j - 1] / last_layer[j - 1].sum()).reshape(6, 6).numpy()
        assert np.array(token["layers"][-1]) == pytest.approx(expected, abs=1e-5)


def test_overlay_png_lays_out_one_panel_per_token(predictor: CaptionPredictor) -> None:
    image = IMAGES[2]
    result = predictor.predict(
        [CaptionItem(image, None, GenerationOptions(max_new_tokens=6), attention=True)]
    )[0]
    payload = result.attention
    assert payload is not None
    n = len(payload["tokens"])
    assert n == 6
    overlay = Image.open(io.BytesIO(overlay_png(image, payload)))
    assert overlay.format == "PNG"
    assert overlay.size == (4 * image.width, 2 * image.height)
    first_panel = np.asarray(overlay.crop((0, 0, image.width, image.height)), dtype=float)
    assert np.abs(first_panel - np.asarray(image, dtype=float)).mean() > 5  # heat drawn on it
    wide = Image.open(io.BytesIO(overlay_png(image, payload, columns=10)))
    assert wide.size == (n * image.width, image.height)
    small = Image.open(io.BytesIO(overlay_png(image, payload, columns=3, max_height=20)))
    assert small.height == 2 * 20
    empty = Image.open(io.BytesIO(overlay_png(image, {"grid": [6, 6], "tokens": []})))
    assert empty.size == image.size


# -- adapters ----------------------------------------------------------------------------


def _save_lora(model_dir: Path, out: Path, *, on_decoder: bool, targets: list[str]) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import BlipForConditionalGeneration

    model = BlipForConditionalGeneration.from_pretrained(model_dir)
    torch.manual_seed(7 if on_decoder else 8)
    # Random (not zero) B matrices, so the adapter visibly changes the captions.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(model.text_decoder if on_decoder else model, config)
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapters(tiny_caption_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caption-adapters")
    return {
        "whole": _save_lora(
            tiny_caption_model, root / "whole", on_decoder=False, targets=["query", "value"]
        ),
        "decoder": _save_lora(
            tiny_caption_model, root / "decoder", on_decoder=True, targets=["query", "dense"]
        ),
        "vision": _save_lora(
            tiny_caption_model, root / "vision", on_decoder=False, targets=["qkv"]
        ),
    }


@pytest.fixture
def adapted(tiny_caption_model: Path, adapters: dict[str, Path]) -> Iterator[CaptionPredictor]:
    p = CaptionPredictor(str(tiny_caption_model))
    p.setup("cpu")
    p.load_adapter("whole", adapters["whole"])
    p.load_adapter("decoder", adapters["decoder"])
    yield p


def test_adapters_change_captions_only_when_named(
    adapted: CaptionPredictor, predictor: CaptionPredictor, adapters: dict[str, Path]
) -> None:
    from peft import PeftModel
    from transformers import BlipForConditionalGeneration

    assert adapted.adapters == ["decoder", "whole"]
    gen = GenerationOptions(max_new_tokens=10)
    base = [r.text for r in predictor.predict([CaptionItem(im, None, gen) for im in IMAGES[:4]])]
    runs = {
        name: [
            r.text for r in adapted.predict([CaptionItem(im, None, gen, name) for im in IMAGES[:4]])
        ]
        for name in ("whole", "decoder", None)
    }
    assert runs[None] == base
    assert runs["whole"] != base and runs["decoder"] != base and runs["whole"] != runs["decoder"]

    # The same adapter applied by peft itself gives the same captions.
    reference = PeftModel.from_pretrained(
        BlipForConditionalGeneration.from_pretrained(str(predictor.model_id)), adapters["whole"]
    ).eval()
    inputs = adapted.processor(images=IMAGES[:4], return_tensors="pt")
    with torch.inference_mode():
        expected = adapted.processor.batch_decode(
            reference.generate(**inputs, max_new_tokens=10), skip_special_tokens=True
        )
    assert runs["whole"] == [t.strip() for t in expected]

    adapted.unload_adapter("whole")
    assert adapted.adapters == ["decoder"]
    with pytest.raises(InvalidInput, match="not loaded"):
        adapted.predict([CaptionItem(IMAGES[0], None, gen, "whole")])
    assert [
        r.text for r in adapted.predict([CaptionItem(im, None, gen) for im in IMAGES[:4]])
    ] == base


def test_adapter_reload_replaces_the_old_weights(
    adapted: CaptionPredictor, adapters: dict[str, Path]
) -> None:
    gen = GenerationOptions(max_new_tokens=10)
    decoder_text = adapted.predict([CaptionItem(IMAGES[0], None, gen, "decoder")])[0].text
    adapted.load_adapter("whole", adapters["decoder"])
    assert adapted.predict([CaptionItem(IMAGES[0], None, gen, "whole")])[0].text == decoder_text


def test_bad_adapters_are_refused(
    adapted: CaptionPredictor, adapters: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ModelError, match="text decoder"):
        adapted.load_adapter("vision", adapters["vision"])
    assert "vision" not in adapted.adapters

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(
        (adapters["whole"] / "adapter_config.json").read_text()
    )
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelError, match="safetensors only"):
        adapted.load_adapter("pickled", pickled)
    assert adapted.adapters == ["decoder", "whole"]
