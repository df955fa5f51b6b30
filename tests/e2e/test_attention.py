"""Caption cross-attention end to end: a real caption worker, grids and overlays in storage."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from imageq.workers.io.storage import file_uri_path
from imageq.workers.predictors.attention import (
    OVERLAY_MAX_PIXELS,
    OVERLAY_MAX_SIDE,
    panel_size,
    peak_cell,
)
from tests.fixtures.services import Stack
from tests.helpers import data_uri


def _picture(size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth colour gradients with a bright square: structure to draw heat over."""
    width, height = size
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    rng = np.random.default_rng(seed)
    colour = rng.uniform(40, 200, (1, 1, 3))
    pixels = colour * (0.5 + 0.5 * x) * (0.6 + 0.4 * y) * np.ones((height, width, 3))
    pixels[height // 4 : height // 2, width // 2 : 3 * width // 4] = 250
    return Image.fromarray(pixels.astype(np.uint8))


def _uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return data_uri(buf.getvalue())


@pytest.fixture(scope="module")
def model_config(tiny_caption_model: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((tiny_caption_model / "config.json").read_text())
    return config


@pytest.fixture(scope="module")
def stack(make_stack: Callable[..., Stack], tiny_caption_model: Path) -> Stack:
    s = make_stack(IMAGEQ_MODEL_CAPTION=str(tiny_caption_model))
    s.worker("caption", "caption@attention")
    return s


def _caption(stack: Stack, images: list[Image.Image], **fields: Any) -> dict[str, Any]:
    job = stack.client.caption(images=[_uri(im) for im in images], **fields)
    record = stack.client.wait(job.id, 60)
    assert record.status == "succeeded", record.error
    assert record.output is not None
    return {"id": job.id, **record.output}


def _stored(ref: dict[str, Any]) -> bytes:
    return file_uri_path(ref["uri"]).read_bytes()


def test_grids_follow_the_config_and_are_normalised(
    stack: Stack, model_config: dict[str, Any]
) -> None:
    vision, text = model_config["vision_config"], model_config["text_config"]
    rows = cols = vision["image_size"] // vision["patch_size"]
    n_layers = text["num_hidden_layers"]
    pictures = [_picture((64, 48), 1), _picture((40, 90), 2)]
    output = _caption(stack, pictures, attention=True, generation={"max_new_tokens": 6})
    payloads = []
    for index, caption in enumerate(output["captions"]):
        summary = caption["attention"]
        assert summary["grid"] == [rows, cols] and summary["layers"] == n_layers
        assert summary["json"]["uri"].endswith(f"jobs/{output['id']}/attention-{index}.json")
        payload = json.loads(_stored(summary["json"]))
        payloads.append(payload)
        assert payload["grid"] == [rows, cols]
        assert payload["text"] == caption["text"]
        tokens = payload["tokens"]
        assert 0 < len(tokens) <= 6
        assert [t["token"] for t in summary["tokens"]] == [t["token"] for t in tokens]
        for inline, token in zip(summary["tokens"], tokens, strict=True):
            mean, layers = np.array(token["mean"]), np.array(token["layers"])
            assert mean.shape == (rows, cols) and layers.shape == (n_layers, rows, cols)
            assert (mean >= 0).all() and (layers >= 0).all()
            # Each grid is a distribution over the image patches (6 decimals stored).
            assert mean.sum() == pytest.approx(1.0, abs=1e-4)
            assert layers.sum(axis=(1, 2)) == pytest.approx(np.ones(n_layers), abs=1e-4)
            average = layers.mean(axis=0)
            assert mean == pytest.approx(average / average.sum(), abs=1e-5)
            peak = np.unravel_index(int(np.argmax(mean)), mean.shape)
            assert inline["peak"] == [int(peak[0]), int(peak[1])]
    # Two different pictures: the decoder looked at them differently.
    first = [np.array(p["tokens"][0]["mean"]) for p in payloads]
    assert not np.allclose(first[0], first[1])


def test_overlay_png_is_the_size_of_the_input_image(stack: Stack) -> None:
    pictures = [_picture((120, 80), 3), _picture((70, 100), 4)]
    output = _caption(stack, pictures, attention=True, generation={"max_new_tokens": 5})
    for index, (picture, caption) in enumerate(zip(pictures, output["captions"], strict=True)):
        summary = caption["attention"]
        ref = summary["overlay"]
        assert ref["uri"].endswith(f"jobs/{output['id']}/attention-{index}.png")
        data = _stored(ref)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        overlay = Image.open(io.BytesIO(data))
        n = len(summary["tokens"])
        width, height = picture.size
        assert summary["panel"] == [width, height]
        columns = min(n, 4)
        assert overlay.size == (columns * width, math.ceil(n / 4) * height)
        panels = [
            np.asarray(
                overlay.crop(
                    ((k % 4) * width, (k // 4) * height, (k % 4 + 1) * width, (k // 4 + 1) * height)
                ),
                dtype=float,
            )
            for k in range(n)
        ]
        original = np.asarray(picture, dtype=float)
        for panel in panels:
            # The picture is under the heat: the panel follows its light and dark parts.
            brightness = panel.mean(axis=2).ravel()
            assert np.corrcoef(brightness, original.mean(axis=2).ravel())[0, 1] > 0.2
            assert np.abs(panel - original).mean() > 5  # and heat is drawn on it
        if n > 1:
            # Each panel shows its own token's grid.
            assert np.abs(panels[0] - panels[1]).mean() > 1


def test_huge_photo_gets_capped_panels(stack: Stack) -> None:
    huge = Image.new("RGB", (2400, 1200), (90, 140, 200))
    output = _caption(stack, [huge], attention=True, generation={"max_new_tokens": 3})
    summary = output["captions"][0]["attention"]
    n = len(summary["tokens"])
    expected = panel_size(huge.size, n, max_side=OVERLAY_MAX_SIDE, max_pixels=OVERLAY_MAX_PIXELS)
    assert expected == (1024, 512)
    assert summary["panel"] == [1024, 512]
    overlay = Image.open(io.BytesIO(_stored(summary["overlay"])))
    assert overlay.size == (min(n, 4) * 1024, math.ceil(n / 4) * 512)


def test_no_attention_unless_asked(stack: Stack) -> None:
    output = _caption(stack, [_picture((50, 50), 5)])
    assert "attention" not in output["captions"][0]
    assert not list(stack.storage_path("jobs", output["id"]).glob("attention-*"))


# -- the layout rules, without a worker --------------------------------------------------


def test_panel_size_keeps_the_input_size_until_a_limit() -> None:
    assert panel_size((640, 480), 12, max_side=1024, max_pixels=8_000_000) == (640, 480)
    # Longer side over the cap: scaled down, aspect kept.
    assert panel_size((4000, 3000), 1, max_side=1024) == (1024, 768)
    assert panel_size((300, 5000), 1, max_side=1000) == (60, 1000)
    # A long caption over a big photo: the sheet stays within its pixel budget.
    width, height = panel_size((1024, 768), 30, columns=4, max_pixels=8_000_000)
    assert 4 * 8 * width * height <= 8_000_000
    assert width / height == pytest.approx(1024 / 768, rel=0.01)
    assert panel_size((100, 50), 3, max_height=20) == (40, 20)
    assert panel_size((3, 3), 0, max_side=1, max_pixels=1) == (1, 1)


def test_peak_cell_is_the_first_largest_cell() -> None:
    assert peak_cell([[0.1, 0.2], [0.4, 0.3]]) == [1, 0]
    assert peak_cell([[0.5, 0.5], [0.0, 0.0]]) == [0, 0]


def test_resize_modes_map_attention_back_onto_a_panorama(stack: Stack) -> None:
    panorama = _picture((400, 100), 5)
    out = {
        mode: _caption(
            stack,
            [panorama],
            attention=True,
            resize=mode,
            generation={"max_new_tokens": 4, "num_beams": 2, "num_return_sequences": 2},
        )
        for mode in ("stretch", "center_crop", "letterbox")
    }
    rows, cols = out["stretch"]["captions"][0]["attention"]["grid"]
    expected = {
        "stretch": ([rows, cols], [0, 0, cols, rows]),
        # The centre square: the photo reaches 1.5 crop widths past each side.
        "center_crop": ([rows, cols], [-1.5 * cols, 0, 2.5 * cols, rows]),
        # The photo's band: rows 3/8 .. 5/8 of the square, the padding left out.
        "letterbox": (None, None),
    }
    for mode, result in out.items():
        caption = result["captions"][0]
        assert len(caption["attentions"]) == 2  # one per returned sequence
        for s, attention in enumerate(caption["attentions"]):
            assert attention["frame"]["resize"] == mode
            assert attention["panel"] == [400, 100]
            grids = json.loads(_stored(attention["json"]))
            assert grids["text"] == caption["texts"][s]
            overlay = Image.open(io.BytesIO(_stored(attention["overlay"])))
            assert overlay.height == 100
            grid, box = expected[mode]
            if grid is not None:
                assert attention["grid"] == grid and attention["frame"]["box"] == box
        if mode == "letterbox":
            kept = caption["attention"]["grid"]
            assert kept[1] == cols and kept[0] < rows
            for token in json.loads(_stored(caption["attention"]["json"]))["tokens"]:
                assert math.isclose(float(np.sum(token["mean"])), 1.0, abs_tol=1e-4)
