"""Device pinning and the caption/match speed options (dtype, channels-last, compile)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from imageq.api_client.errors import ModelError
from imageq.api_client.inputs import GenerationOptions
from imageq.api_client.settings import Settings
from imageq.workers.ops.devices import SpeedOptions, node_suffix, pin_cuda
from imageq.workers.predictors.caption import CaptionItem, CaptionPredictor
from imageq.workers.predictors.match import MatchItem, MatchPredictor


def test_pin_cuda_translates_the_index_through_an_inherited_list() -> None:
    assert pin_cuda("cuda:2", {}) == ("cuda:0", {"CUDA_VISIBLE_DEVICES": "2"})
    assert pin_cuda("cuda:1", {"CUDA_VISIBLE_DEVICES": "4,6"})[1]["CUDA_VISIBLE_DEVICES"] == "6"
    assert pin_cuda("cpu", {"X": "1"}) == ("cpu", {"X": "1"})
    assert pin_cuda("auto", {}) == ("auto", {})
    with pytest.raises(ValueError, match="lists 2 device"):
        pin_cuda("cuda:2", {"CUDA_VISIBLE_DEVICES": "4,6"})
    assert node_suffix("cuda:3") == "gpu3" and node_suffix("cuda") == "gpu0"


def test_settings_carry_the_speed_options() -> None:
    settings = Settings.from_env(
        {"IMAGEQ_DTYPE": "bf16", "IMAGEQ_CHANNELS_LAST": "1", "IMAGEQ_TORCH_COMPILE": "yes"}
    )
    speed = SpeedOptions.from_settings(settings)
    assert speed == SpeedOptions(dtype="bf16", channels_last=True, torch_compile=True)
    assert SpeedOptions.from_settings(Settings()) == SpeedOptions()


def test_dtype_choice() -> None:
    auto = SpeedOptions()
    assert auto.torch_dtype("cpu") == torch.float32
    assert auto.torch_dtype("cuda:0") == torch.float16
    assert SpeedOptions(half_precision=False).torch_dtype("cuda:0") == torch.float32
    assert SpeedOptions(dtype="bf16").torch_dtype("cpu") == torch.bfloat16
    assert SpeedOptions(dtype="fp32").torch_dtype("cuda:0") == torch.float32
    with pytest.raises(ModelError, match="dtype 'half'"):
        SpeedOptions(dtype="half")


def test_a_bad_dtype_setting_is_refused() -> None:
    with pytest.raises(ModelError, match="expected one of auto, fp32, fp16, bf16"):
        SpeedOptions.from_settings(Settings(dtype="float8"))


def _caption(predictor: CaptionPredictor) -> list[str]:
    items = [
        CaptionItem(Image.new("RGB", (40, 30), color), None, GenerationOptions(max_new_tokens=6))
        for color in ((200, 30, 30), (30, 30, 200))
    ]
    return [r.text for r in predictor.predict(items)]


def test_caption_options_load_the_model_as_asked(tiny_caption_model: Path) -> None:
    plain = CaptionPredictor(str(tiny_caption_model), half_precision=False)
    plain.setup("cpu")
    fast = CaptionPredictor(
        str(tiny_caption_model), speed=SpeedOptions(dtype="bf16", channels_last=True)
    )
    fast.setup("cpu")
    assert plain.dtype == torch.float32 and fast.dtype == torch.bfloat16
    patch = fast.model.vision_model.embeddings.patch_embedding.weight
    assert patch.is_contiguous(memory_format=torch.channels_last)
    assert not plain.model.vision_model.embeddings.patch_embedding.weight.is_contiguous(
        memory_format=torch.channels_last
    )
    # channels-last alone changes no number: the same captions as the plain model.
    layout = CaptionPredictor(str(tiny_caption_model), speed=SpeedOptions(channels_last=True))
    layout.setup("cpu")
    assert _caption(layout) == _caption(plain)
    assert all(_caption(fast))


def test_match_options_load_the_model_as_asked(tiny_match_model: Path) -> None:
    predictor = MatchPredictor(
        str(tiny_match_model), speed=SpeedOptions(dtype="bf16", channels_last=True)
    )
    predictor.setup("cpu")
    assert predictor.model.dtype == torch.bfloat16
    result = predictor.predict([MatchItem(Image.new("RGB", (40, 30), (9, 90, 200)), ["a dog"])])
    assert 0.0 <= result[0].itm[0] <= 1.0


def test_a_compiled_vision_encoder_gives_the_eager_captions(tiny_caption_model: Path) -> None:
    eager = CaptionPredictor(str(tiny_caption_model), half_precision=False)
    eager.setup("cpu")
    compiled = CaptionPredictor(str(tiny_caption_model), speed=SpeedOptions(torch_compile=True))
    compiled.setup("cpu")  # compiles during the warm-up pass
    assert compiled.model.vision_model._compiled_call_impl is not None
    assert _caption(compiled) == _caption(eager)
