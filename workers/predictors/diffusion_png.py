"""Output images of diffusion jobs: their size rules and their PNG encoding.

Sizes: SD's VAE downsamples 8x, so every output side is a multiple of 8; a deployment
caps the pixels of one output (``IMAGEQ_MAX_OUTPUT_PIXELS``) to bound GPU memory.

Each PNG carries a ``parameters`` text chunk in the format AUTOMATIC1111 writes, so the
tools that read those (A1111's "PNG Info", ComfyUI, InvokeAI, civitai) show how an
image was made, and the same job can be run again from the file alone; and an XMP
packet with its IPTC digital source type (``imageq.workers.provenance.claims``), which says it
was made by a model. The signed C2PA manifest is added afterwards
(``imageq.workers.provenance.signing``).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin
from PIL.PngImagePlugin import PngInfo

from imageq.api_client.errors import InvalidInput
from imageq.workers.provenance.claims import XMP_KEY, Origin, read_source_type, xmp_packet

PARAMETERS_KEY = "parameters"
MIN_SIDE, MAX_SIDE = 64, 2048


def a1111_parameters(p: dict[str, Any]) -> str:
    """The ``parameters`` text AUTOMATIC1111 writes into its PNGs (other tools read it)."""
    negative = f"\nNegative prompt: {p['negative_prompt']}" if p.get("negative_prompt") else ""
    items: dict[str, Any] = {
        "Steps": p["steps"],
        "Sampler": p["sampler"],
        "CFG scale": p["guidance_scale"],
        "Seed": p["seed"],
        "Size": f"{p['width']}x{p['height']}",
        "Model": p["model"],
        "Denoising strength": p.get("strength"),
        "IP-Adapter scale": p.get("style_scale"),
    }
    if p.get("adapters"):  # A1111 quotes values that hold commas
        items["Adapters"] = (
            '"' + ", ".join(f"{a['name']}:{a['scale']}" for a in p["adapters"]) + '"'
        )
    listed = ", ".join(f"{key}: {value}" for key, value in items.items() if value is not None)
    return f"{p.get('prompt', '')}{negative}\n{listed}"


def encode_png(
    image: Image.Image, parameters: dict[str, Any], origin: Origin = Origin.CREATED
) -> bytes:
    """``image`` as PNG bytes with ``a1111_parameters(parameters)`` in a text chunk and
    ``origin``'s digital source type in XMP.

    The encoding is deterministic (no timestamps), so equal pixels and parameters give
    equal bytes: what the reproducibility guarantee is stated in.
    """
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, a1111_parameters(parameters))
    info.add_itxt(XMP_KEY, xmp_packet(origin))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_parameters(png: bytes) -> str | None:
    """The ``parameters`` text of a PNG, or None when it has none."""
    with Image.open(io.BytesIO(png)) as image:
        if not isinstance(image, PngImagePlugin.PngImageFile):
            return None
        text = image.text.get(PARAMETERS_KEY)
    return None if text is None else str(text)


def read_png_source_type(png: bytes) -> str | None:
    """The IPTC digital source type in a PNG's XMP, or None when it states none."""
    with Image.open(io.BytesIO(png)) as image:
        if not isinstance(image, PngImagePlugin.PngImageFile):
            return None
        xmp = image.text.get(XMP_KEY)
    return None if xmp is None else read_source_type(str(xmp))


def display_name(model_id: str) -> str:
    """What the ``Model`` entry shows: a hub id's name or a directory's name, never the
    worker's filesystem layout."""
    return Path(model_id.rstrip("/")).name or model_id


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """``InvalidInput`` for a requested output size over the pixel cap (before GPU work)."""
    if width * height > max_pixels:
        raise InvalidInput(
            f"width, height: {width}x{height} is {width * height} pixels, over this "
            f"deployment's limit of {max_pixels} (IMAGEQ_MAX_OUTPUT_PIXELS)"
        )


def fit_size(width: int, height: int, max_pixels: int | None = None) -> tuple[int, int]:
    """The output size for an input image: scaled down (aspect ratio kept) to at most
    2048 px a side and ``max_pixels`` pixels, then rounded down to multiples of 8 (the
    VAE's downsampling factor)."""
    scale = min(1.0, MAX_SIDE / max(width, height))
    if max_pixels is not None:
        scale = min(scale, math.sqrt(max_pixels / (width * height)))
    w, h = int(width * scale) // 8 * 8, int(height * scale) // 8 * 8
    if w < MIN_SIDE or h < MIN_SIDE:
        raise InvalidInput(f"image: {width}x{height} is too small (at least 64x64)")
    return w, h


def fit_mask(mask: Image.Image, image_size: tuple[int, int], size: tuple[int, int]) -> Image.Image:
    """A grey mask of ``size``; one of another size is accepted if its aspect ratio matches."""
    if mask.size != image_size:
        (mw, mh), (iw, ih) = mask.size, image_size
        if abs((mw / mh) / (iw / ih) - 1.0) > 0.01:
            raise InvalidInput(
                f"mask: {mw}x{mh} does not fit the {iw}x{ih} image (aspect ratios differ)"
            )
    # NEAREST keeps a hard mask hard; the pipeline binarises at 50% grey anyway.
    return mask.convert("L").resize(size, Image.Resampling.NEAREST)


def check_strength(steps: int, strength: float) -> None:
    # The pipelines run int(steps * strength) steps and fail on zero.
    if int(steps * strength) < 1:
        raise InvalidInput(
            f"strength: {steps} steps at strength {strength} leave no step to run; "
            "raise steps or strength"
        )


def resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    image = image.convert("RGB")
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


@dataclass(frozen=True)
class GeneratedImage:
    """One output image, still as pixels: ``png()`` encodes it.

    Encoding is left to the caller because it is slow (a 512x512 PNG: about 110 ms of
    CPU on the 2-core test machine) and the pipeline's thread should spend that time on
    the next call: a job encodes its own images on its own thread.
    """

    image: Image.Image
    seed: int
    parameters: dict[str, Any] = field(default_factory=dict)
    #: The safety checker blacked this image out (only with IMAGEQ_SAFETY_CHECKER).
    nsfw: bool = False
    #: Generated from a prompt, or an input image edited (its provenance claims).
    origin: Origin = Origin.CREATED

    @property
    def width(self) -> int:
        return int(self.image.width)

    @property
    def height(self) -> int:
        return int(self.image.height)

    def png(self) -> bytes:
        """The PNG, its parameters in an A1111 text chunk and its digital source type in
        XMP; equal pixels and parameters give equal bytes."""
        return encode_png(self.image, self.parameters, self.origin)


def paste_unmasked(
    images: list[tuple[Image.Image, bool]], base: Image.Image, mask: Image.Image
) -> list[tuple[Image.Image, bool]]:
    """Each output with ``base``'s own pixels wherever ``mask`` is black (below 50%, as
    the pipeline binarises it): the VAE's round trip changes every pixel, even those the
    mask keeps (a mean absolute difference of 65 of 255 with the tiny test VAE).
    Images the safety checker blanked stay blank."""
    keep = mask.convert("L").point(lambda v: 255 if v >= 128 else 0)
    return [
        (image if nsfw else Image.composite(image.convert("RGB"), base, keep), nsfw)
        for image, nsfw in images
    ]
