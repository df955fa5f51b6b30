"""A job's images: all fetched and their pixels budgeted first, then decoded one at a time.

``IMAGEQ_MAX_JOB_PIXELS`` is checked from the headers before anything is decoded, so a
job naming one small, highly compressible 6000 x 6000 PNG 512 times is refused having
cost a 33 KB download, not 60 GB of decoded pixels (docs/reliability.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image

from imageq.api_client.errors import ImageqError, InvalidInput
from imageq.api_client.settings import Settings
from imageq.workers.io.images import decode_image, fetch_bytes, header_size
from imageq.workers.io.storage import Storage

# Caption and match decode images to at least twice the model's input side (reduced by
# whole factors, so 2x to 4x): the processor's bicubic resize still makes the last step
# down from a larger image, as it did from the full-size photo, and a reduced 6000 px
# photo holds 0.7 Mpx instead of 36 (bench/image_memory.py measures both).
MODEL_SIDE_MARGIN = 2


def decode_side(model_side: int) -> int:
    """The smallest side a model whose input is ``model_side`` pixels square needs."""
    return MODEL_SIDE_MARGIN * model_side


@dataclass(frozen=True)
class Named:
    """One image reference of a job and the input field naming it (``images[3]``)."""

    field: str
    ref: str


def field_error(field: str, error: ImageqError) -> ImageqError:
    """``error`` with the input field it concerns named first."""
    return type(error)(f"input.{field}: {error.message}")


def over_budget(total: int, count: int, settings: Settings) -> InvalidInput:
    """The error of a job whose first ``count`` images hold ``total`` pixels, too many."""
    return InvalidInput(
        f"the job's images hold more than max_job_pixels (IMAGEQ_MAX_JOB_PIXELS) = "
        f"{settings.max_job_pixels} decoded pixels: the first {count} already hold {total}"
    )


def fetch_all(refs: Sequence[Named], settings: Settings, storage: Storage) -> list[bytes]:
    """Every image's bytes, in order, once the job's pixel budget is known to hold.

    A reference named several times is fetched once (its bytes are shared) but its
    pixels count every time: each naming is decoded.
    """
    fetched: dict[str, bytes] = {}
    blobs: list[bytes] = []
    total = 0
    for count, named in enumerate(refs, 1):
        try:
            data = fetched.get(named.ref)
            if data is None:
                data = fetched[named.ref] = fetch_bytes(named.ref, settings, storage)
            width, height = header_size(data, settings)
        except ImageqError as exc:
            raise field_error(named.field, exc) from None
        total += width * height
        if total > settings.max_job_pixels:
            raise over_budget(total, count, settings)
        blobs.append(data)
    return blobs


def load_all(
    refs: Sequence[Named], settings: Settings, storage: Storage, min_side: int | None = None
) -> Iterator[Image.Image]:
    """Fetch and budget every image now; the iterator then decodes them one by one.

    Only the image being decoded is held at full size: the caller keeps what it needs of
    each (a reduced copy, the model's input tensor) before asking for the next.
    """
    blobs = fetch_all(refs, settings, storage)
    blobs.reverse()  # popped from the end: each image's bytes go once it is decoded

    def decode() -> Iterator[Image.Image]:
        for named in refs:
            data = blobs.pop()
            try:
                image = decode_image(data, settings, min_side)
            except ImageqError as exc:
                raise field_error(named.field, exc) from None
            del data
            yield image

    return decode()


def load_job_images(
    refs: Sequence[str], settings: Settings, storage: Storage, min_side: int | None = None
) -> Iterator[Image.Image]:
    """``load_all`` for a job's ``images`` list (caption, match)."""
    named = [Named(f"images[{i}]", ref) for i, ref in enumerate(refs)]
    return load_all(named, settings, storage, min_side)
