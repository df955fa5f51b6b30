"""OpenAI's Images API in imageq's terms: sizes, quality presets, masks, model aliases
and OpenAI's error shape. Pure functions; the routes are ``openai_images``.

An app that calls ``/v1/images/generations`` with the official ``openai`` client points
its ``base_url`` at the gateway and needs no new code (docs/design.md §11).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import Enum
from io import BytesIO
from typing import Any

from PIL import Image

from imageq.api_client.errors import InvalidInput

#: Paths answered in OpenAI's error shape; every other path keeps imageq's own.
OPENAI_PATHS = ("/v1/images/", "/v1/models")

#: ``quality`` -> denoising steps. OpenAI's names (dall-e-3: standard/hd, gpt-image:
#: low/medium/high/auto); imageq's own default is 25 steps, "medium".
QUALITY_STEPS: dict[str, int] = {
    "low": 15,
    "medium": 25,
    "standard": 25,
    "auto": 25,
    "high": 40,
    "hd": 40,
}

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_ADAPTER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

#: OpenAI's error ``type`` for a status; its client picks the exception by status alone.
_TYPES = {401: "authentication_error", 429: "rate_limit_error"}


class ResponseFormat(Enum):
    B64_JSON = "b64_json"
    URL = "url"


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PATHS)


def openai_error(
    status: int, code: str, message: str, param: str | None = None
) -> tuple[int, dict[str, Any]]:
    """An imageq error as OpenAI answers it: ``{"error": {message, type, param, code}}``.

    imageq's 422 (an input that does not validate) is OpenAI's 400, which its client
    raises as ``BadRequestError``.
    """
    if status == 422:
        status = 400
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def parse_size(value: Any, max_pixels: int) -> tuple[int, int] | None:
    """``"WxH"`` -> (width, height); None for ``auto`` or no size (the kind's default).

    The multiple-of-8 and 64..2048 rules are the input model's; the pixel cap is checked
    here too so that a size too large is refused before it becomes a job.
    """
    if value is None or value == "auto":
        return None
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise InvalidInput(f"size: {value!r} is not WIDTHxHEIGHT (e.g. 512x512) or auto")
    width, height = int(match.group(1)), int(match.group(2))
    if width * height > max_pixels:
        raise InvalidInput(
            f"size: {width}x{height} is {width * height} pixels, over the limit of {max_pixels}"
        )
    return width, height


def steps_for(quality: Any) -> int | None:
    """The steps a ``quality`` preset names; None when not given."""
    if quality is None:
        return None
    steps = QUALITY_STEPS.get(str(quality).lower()) if isinstance(quality, str) else None
    if steps is None:
        raise InvalidInput(f"quality: expected one of {', '.join(QUALITY_STEPS)}")
    return steps


def response_format(value: Any) -> ResponseFormat:
    """OpenAI's default for dall-e models is ``url``."""
    if value is None:
        return ResponseFormat.URL
    try:
        return ResponseFormat(value)
    except ValueError:
        raise InvalidInput("response_format: expected b64_json or url") from None


def parse_models(setting: str) -> dict[str, str | None]:
    """``"imageq-sd,anime=anime-lora"`` -> {alias: adapter or None}, in order."""
    models: dict[str, str | None] = {}
    for entry in setting.split(","):
        alias, _, adapter = (part.strip() for part in entry.partition("="))
        if not alias:
            continue
        if adapter and not _ADAPTER.match(adapter):
            raise ValueError(f"gateway_openai_models: {adapter!r} is not an adapter name")
        models[alias] = adapter or None
    if not models:
        raise ValueError("gateway_openai_models: name at least one model alias")
    return models


def model_adapter(models: Mapping[str, str | None], model: Any) -> str | None:
    """The adapter a requested model alias stands for; the default alias when none."""
    if model is None:
        return next(iter(models.values()))
    if not isinstance(model, str) or model not in models:
        raise InvalidInput(f"model: {model!r} is not one of {', '.join(models)}")
    return models[model]


def _number(name: str, value: Any, kind: type[int] | type[float]) -> int | float:
    # Multipart forms carry every field as text; JSON bodies carry numbers.
    if isinstance(value, bool):
        raise InvalidInput(f"{name}: expected a number")
    try:
        return kind(value)
    except (TypeError, ValueError):
        expected = "an integer" if kind is int else "a number"
        raise InvalidInput(f"{name}: expected {expected}") from None


def diffusion_fields(params: Mapping[str, Any], models: Mapping[str, str | None]) -> dict[str, Any]:
    """The fields every diffusion kind shares, from an images request: ``n``,
    ``quality`` (steps), ``model`` (an alias's adapter) and the extras a client passes
    in ``extra_body`` (negative_prompt, seed, steps, guidance_scale, scheduler,
    adapter). Range checks are the input model's, at submit."""
    fields: dict[str, Any] = {}
    if params.get("n") is not None:
        fields["num_images"] = _number("n", params["n"], int)
    steps = steps_for(params.get("quality"))
    if params.get("steps") is not None:
        steps = int(_number("steps", params["steps"], int))
    if steps is not None:
        fields["steps"] = steps
    if params.get("seed") is not None:
        fields["seed"] = _number("seed", params["seed"], int)
    if params.get("guidance_scale") is not None:
        fields["guidance_scale"] = _number("guidance_scale", params["guidance_scale"], float)
    for name in ("negative_prompt", "scheduler"):
        if params.get(name) is not None:
            fields[name] = params[name]
    adapters = [model_adapter(models, params.get("model")), params.get("adapter")]
    chosen = [{"name": name} for name in dict.fromkeys(a for a in adapters if a)]
    if chosen:
        fields["adapters"] = chosen
    return fields


def mask_from_alpha(data: bytes) -> bytes:
    """OpenAI's mask (transparent pixels are repainted) as imageq's (white is repainted):
    an 8-bit greyscale PNG, 255 where the mask's alpha is 0, else 0.

    A mask with no alpha channel cannot say what to repaint: refused, as OpenAI does.
    """
    try:
        with Image.open(BytesIO(data)) as image:
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            if not has_alpha:
                raise InvalidInput("mask: needs an alpha channel (transparent = repaint)")
            alpha = image.convert("RGBA").getchannel("A")
    except InvalidInput:
        raise
    except Exception as exc:  # PIL raises many types on a damaged file
        raise InvalidInput(f"mask: could not read the image ({type(exc).__name__})") from None
    repaint = alpha.point(lambda a: 255 if a == 0 else 0)
    out = BytesIO()
    repaint.save(out, format="PNG")
    return out.getvalue()
