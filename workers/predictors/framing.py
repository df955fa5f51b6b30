"""How an image becomes the vision encoder's input (``resize``), and where it lies there.

BLIP's processor stretches every image to its input size (384 x 384), so a 4:1
panorama is seen squashed to a quarter of its width. A job may ask instead for

- ``center_crop``: the largest centred box of the input's aspect ratio, cropped, then
  resized (what falls outside it is not seen at all);
- ``letterbox``: the whole image scaled to fit, the rest padded with the processor's
  mean colour (which normalises to exactly zero).

Both are made here on the decoded image, before the processor's own resize, which then
scales uniformly. A ``Frame`` records where the original image lies on the input, so
attention grids map back onto the photo (``imageq.workers.predictors.attention``).
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from imageq.api_client.inputs import Resize

__all__ = ["Frame", "Resize", "framed"]


@dataclass(frozen=True)
class Frame:
    """Where the original image lies on the model input: ``box`` is (left, top, right,
    bottom) in fractions of the input's width and height. A stretched image fills it
    (0, 0, 1, 1); a cropped one reaches past it; a letterboxed one sits inside it."""

    resize: Resize
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)


def _target(size: tuple[int, int], aspect: float, *, crop: bool) -> tuple[int, int]:
    """(width, height) of ``aspect`` (width / height) cropped from or padded around
    ``size``, in whole pixels."""
    width, height = size
    wider = width / height > aspect
    if crop:
        return (
            (max(1, round(height * aspect)), height)
            if wider
            else (width, max(1, round(width / aspect)))
        )
    return (
        (width, max(1, round(width / aspect)))
        if wider
        else (max(1, round(height * aspect)), height)
    )


def framed(
    image: Image.Image,
    resize: Resize,
    input_size: tuple[int, int],
    fill: tuple[int, int, int],
) -> tuple[Image.Image, Frame]:
    """``image`` cropped or padded to the input's aspect ratio (``input_size`` is the
    model's (width, height)), and its ``Frame``. ``stretch`` returns the image itself."""
    if resize is Resize.STRETCH:
        return image, Frame(resize)
    width, height = image.size
    aspect = input_size[0] / input_size[1]
    crop = resize is Resize.CENTER_CROP
    out_w, out_h = _target(image.size, aspect, crop=crop)
    left, top = (width - out_w) // 2, (height - out_h) // 2
    if crop:
        cropped = image.crop((left, top, left + out_w, top + out_h))
        box = (-left / out_w, -top / out_h, (width - left) / out_w, (height - top) / out_h)
        return cropped, Frame(resize, box)
    # Padding: the image sits at (-left, -top) of the padded canvas.
    canvas = Image.new("RGB", (out_w, out_h), fill)
    canvas.paste(image.convert("RGB"), (-left, -top))
    box = (-left / out_w, -top / out_h, (width - left) / out_w, (height - top) / out_h)
    return canvas, Frame(resize, box)
