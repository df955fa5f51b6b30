"""The OpenAI-compatible images API's mapping (no services): sizes, quality presets, model
aliases, OpenAI's error shape scoped to its routes, mask conversion, and the worker's
keep-unmasked paste."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
from PIL import Image
from starlette.types import Receive, Scope, Send

from imageq.api_client.errors import InvalidInput
from imageq.api_client.inputs import InpaintInput
from imageq.api_client.settings import Settings
from imageq.gateway.app import create_app
from imageq.gateway.errors import RateLimited, error_response, response_for
from imageq.gateway.guard import Guard
from imageq.gateway.metrics import GatewayMetrics
from imageq.gateway.openai_compat import (
    QUALITY_STEPS,
    ResponseFormat,
    diffusion_fields,
    mask_from_alpha,
    model_adapter,
    openai_error,
    parse_models,
    parse_size,
    response_format,
    steps_for,
)
from imageq.workers.predictors.diffusion_png import paste_unmasked

MODELS = {"imageq-sd": None, "anime": "anime-lora"}


def body(response: Any) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(bytes(response.body))
    return parsed


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# -- sizes, presets, formats, models ---------------------------------------------------


def test_parse_size() -> None:
    assert parse_size("512x768", 1024 * 1024) == (512, 768)
    assert parse_size("auto", 100) is None and parse_size(None, 100) is None


@pytest.mark.parametrize("size", ["banana", "512", "512x", "x512", "-8x8", "512X512", 512, ""])
def test_parse_size_refuses_what_is_not_wxh(size: Any) -> None:
    with pytest.raises(InvalidInput, match=r"^invalid_input: size: "):
        parse_size(size, 1024 * 1024)


def test_parse_size_refuses_over_the_pixel_cap_with_the_shipped_default() -> None:
    cap = Settings().max_output_pixels
    assert parse_size("1024x1024", cap) == (1024, 1024)
    with pytest.raises(InvalidInput, match="over the limit of 1048576"):
        parse_size("1536x1024", cap)


def test_quality_presets_are_steps() -> None:
    assert steps_for(None) is None
    assert [steps_for(q) for q in ("low", "medium", "standard", "high", "hd", "HD")] == [
        15,
        25,
        25,
        40,
        40,
        40,
    ]
    assert QUALITY_STEPS["auto"] == 25
    for bad in ("ultra", 3):
        with pytest.raises(InvalidInput, match=r"^invalid_input: quality: "):
            steps_for(bad)


def test_response_format_defaults_to_url_as_openai_does() -> None:
    assert response_format(None) is ResponseFormat.URL
    assert response_format("b64_json") is ResponseFormat.B64_JSON
    with pytest.raises(InvalidInput, match=r"^invalid_input: response_format: "):
        response_format("png")


def test_parse_models() -> None:
    assert parse_models(Settings().gateway_openai_models) == {"imageq-sd": None}
    assert parse_models(" imageq-sd , anime = anime-lora ,") == MODELS
    for bad in ("", " , ", "x=../etc"):
        with pytest.raises(ValueError):
            parse_models(bad)


def test_a_bad_models_setting_stops_the_app_from_being_built() -> None:
    with pytest.raises(ValueError, match="gateway_openai_models"):
        create_app(Settings(gateway_openai_models="x=not a name"))


def test_model_adapter() -> None:
    assert model_adapter(MODELS, None) is None
    assert model_adapter(MODELS, "anime") == "anime-lora"
    with pytest.raises(
        InvalidInput, match=r"^invalid_input: model: 'dall-e-3' is not one of imageq-sd, anime"
    ):
        model_adapter(MODELS, "dall-e-3")


def test_diffusion_fields_from_json_and_from_form_text() -> None:
    assert diffusion_fields({}, MODELS) == {}
    from_json = diffusion_fields(
        {"n": 2, "quality": "hd", "seed": 7, "guidance_scale": 5, "negative_prompt": "blur"},
        MODELS,
    )
    assert from_json == {
        "num_images": 2,
        "steps": 40,
        "seed": 7,
        "guidance_scale": 5.0,
        "negative_prompt": "blur",
    }
    # Multipart forms carry text; an explicit steps beats the quality preset.
    from_form = diffusion_fields(
        {"n": "3", "quality": "low", "steps": "4", "scheduler": "euler", "model": "anime"},
        MODELS,
    )
    assert from_form == {
        "num_images": 3,
        "steps": 4,
        "scheduler": "euler",
        "adapters": [{"name": "anime-lora"}],
    }
    both = diffusion_fields({"model": "anime", "adapter": "ink"}, MODELS)
    assert both["adapters"] == [{"name": "anime-lora"}, {"name": "ink"}]
    same = diffusion_fields({"model": "anime", "adapter": "anime-lora"}, MODELS)
    assert same["adapters"] == [{"name": "anime-lora"}]
    for bad in ({"n": "two"}, {"n": True}, {"seed": "1.5"}, {"guidance_scale": "x"}):
        with pytest.raises(InvalidInput):
            diffusion_fields(bad, MODELS)


# -- masks -----------------------------------------------------------------------------


def test_mask_from_alpha_makes_transparent_white() -> None:
    mask = Image.new("RGBA", (8, 4), (10, 20, 30, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 4, 4))  # transparent left half: repaint
    mask.putpixel((5, 0), (0, 0, 0, 1))  # barely opaque: kept, as OpenAI keeps it
    converted = Image.open(io.BytesIO(mask_from_alpha(png(mask))))
    assert converted.mode == "L" and converted.size == (8, 4)
    grid = np.asarray(converted)
    assert (grid[:, :4] == 255).all() and (grid[:, 4:] == 0).all()


def test_mask_from_alpha_reads_la_and_palette_transparency() -> None:
    la = Image.new("LA", (4, 4), (0, 255))
    la.putpixel((0, 0), (0, 0))
    assert np.asarray(Image.open(io.BytesIO(mask_from_alpha(png(la)))))[0, 0] == 255
    palette = Image.new("P", (4, 4), 1)
    palette.putpixel((1, 1), 0)
    palette.info["transparency"] = 0
    grid = np.asarray(Image.open(io.BytesIO(mask_from_alpha(png(palette)))))
    assert grid[1, 1] == 255 and grid.sum() == 255


def test_mask_without_alpha_or_not_an_image_is_refused() -> None:
    with pytest.raises(InvalidInput, match=r"^invalid_input: mask: needs an alpha channel"):
        mask_from_alpha(png(Image.new("RGB", (4, 4))))
    with pytest.raises(InvalidInput, match=r"^invalid_input: mask: could not read"):
        mask_from_alpha(b"not an image")


def test_paste_unmasked_keeps_the_black_part_exactly() -> None:
    base = Image.new("RGB", (4, 2), (200, 100, 50))
    out = Image.new("RGB", (4, 2), (0, 0, 0))
    mask = Image.new("L", (4, 2), 0)
    mask.paste(200, (0, 0, 2, 2))  # over 50%: repainted
    mask.putpixel((2, 0), 100)  # under 50%: kept
    (pasted, nsfw), (blank, flagged) = paste_unmasked([(out, False), (out, True)], base, mask)
    grid = np.asarray(pasted)
    assert not nsfw and (grid[:, :2] == 0).all() and (grid[:, 2:] == (200, 100, 50)).all()
    assert flagged and blank is out  # the safety checker's blank image stays blank


def test_keep_unmasked_is_opt_in() -> None:
    inp = InpaintInput(image="https://x/a.png", mask="https://x/m.png", prompt="p")
    assert inp.keep_unmasked is False


# -- errors in OpenAI's shape, on its routes only ---------------------------------------


def test_openai_error_statuses_and_types() -> None:
    assert openai_error(422, "invalid_input", "size: bad", "size") == (
        400,
        {
            "error": {
                "message": "size: bad",
                "type": "invalid_request_error",
                "param": "size",
                "code": "invalid_input",
            }
        },
    )
    assert openai_error(401, "unauthorized", "m")[1]["error"]["type"] == "authentication_error"
    assert openai_error(429, "rate_limited", "m")[1]["error"]["type"] == "rate_limit_error"
    assert openai_error(504, "timeout", "m") == (
        504,
        {"error": {"message": "m", "type": "server_error", "param": None, "code": "timeout"}},
    )


def test_error_shape_is_scoped_to_the_openai_routes() -> None:
    exc = InvalidInput("size: 'banana' is not WIDTHxHEIGHT")
    native = response_for(exc, "/v1/jobs")
    assert native.status_code == 422
    assert body(native) == {
        "error": {"code": "invalid_input", "message": exc.message, "field": "size"}
    }
    for path in ("/v1/images/generations", "/v1/images/edits", "/v1/models"):
        shaped = response_for(exc, path)
        assert shaped.status_code == 400
        assert body(shaped)["error"] == {
            "message": exc.message,
            "type": "invalid_request_error",
            "param": "size",
            "code": "invalid_input",
        }
    limited = response_for(RateLimited("slow down", {"Retry-After": "3"}), "/v1/images/edits")
    assert limited.status_code == 429 and limited.headers["retry-after"] == "3"
    assert body(error_response(413, "payload_too_large", "m", path="/v1/uploads")) == {
        "error": {"code": "payload_too_large", "message": "m"}
    }


async def _nothing(scope: Scope, receive: Receive, send: Send) -> None:
    return None


def test_guard_gives_images_calls_their_wait_with_the_shipped_defaults() -> None:
    settings = Settings()
    assert settings.gateway_openai_wait_s == 120.0
    guard = Guard(_nothing, settings, GatewayMetrics())
    waited = settings.gateway_request_timeout_s + settings.gateway_openai_wait_s
    assert guard._deadline_s("POST", "/v1/images/generations") == waited == 150.0
    assert guard._deadline_s("GET", "/v1/models") == settings.gateway_request_timeout_s
    # An image and its mask fit in one edit request.
    assert guard._body_cap("/v1/images/edits") > 2 * settings.max_image_bytes
    assert guard._body_cap("/v1/jobs") == settings.gateway_max_body_bytes


def test_the_openapi_document_names_the_openai_routes_and_shape() -> None:
    schema = create_app(Settings()).openapi()
    paths = schema["paths"]
    for path in ("/v1/images/generations", "/v1/images/edits", "/v1/images/variations"):
        errors = paths[path]["post"]["responses"]
        assert errors["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/OpenAIErrorOut"
        }
    assert "/v1/models" in paths and "/v1/jobs/{job_id}/files/{name}" in paths
