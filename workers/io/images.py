"""Safe loading of image references (DESIGN §2 "Image references").

Every reference a job names is hostile until proven otherwise: URLs may point at the
cloud metadata service or a private network, servers may send forever, and files may be
decompression bombs or other formats wearing a ``.png`` name. Everything here fails as an
``ImageqError`` with a message a caller can show the user.
"""

from __future__ import annotations

import base64
import binascii
import logging
from io import BytesIO
from urllib.parse import urljoin

import requests
from PIL import Image, ImageOps, UnidentifiedImageError

from imageq.api_client.errors import ForbiddenUrl, InputFetchFailed, InvalidInput
from imageq.api_client.image_header import image_size
from imageq.api_client.redact import redact_ref
from imageq.api_client.settings import Settings
from imageq.api_client.uploads import ref_key
from imageq.workers.io.netguard import Deadline, check_url, safe_session
from imageq.workers.io.storage import Storage, StorageError, file_uri_path, open_storage, too_big

log = logging.getLogger(__name__)
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES = 64 * 1024

# --- fetching ----------------------------------------------------------------------


def _fetch_http(url: str, settings: Settings, seconds: float) -> bytes:
    limit = settings.max_image_bytes
    current = url
    with Deadline(seconds) as deadline, safe_session(settings) as session:
        try:
            for _hop in range(settings.max_redirects + 1):
                check_url(current, settings)
                left = deadline.remaining()
                response = session.get(
                    current, stream=True, allow_redirects=False, timeout=(left, left)
                )
                with response:
                    status = response.status_code
                    if status in _REDIRECT_STATUSES:
                        location = response.headers.get("location")
                        if not location:
                            raise InputFetchFailed(f"HTTP {status} without a Location header")
                        current = urljoin(current, location)
                        continue
                    if not 200 <= status < 300:
                        raise InputFetchFailed(f"{redact_ref(current)} answered HTTP {status}")
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > limit:
                        raise too_big("the download", limit)
                    body = bytearray()
                    for chunk in response.iter_content(_CHUNK_BYTES):
                        body += chunk
                        if len(body) > limit:
                            raise too_big("the download", limit)
                    # A socket shut by the deadline can look like a clean end of body.
                    deadline.remaining()
                    return bytes(body)
        except (requests.RequestException, OSError) as exc:
            if deadline.expired:
                raise InputFetchFailed(
                    f"{redact_ref(current)}: deadline of {seconds:g} s exceeded"
                ) from None
            raise InputFetchFailed(f"{redact_ref(current)}: {type(exc).__name__}") from None
    raise InputFetchFailed(f"{redact_ref(url)}: more than {settings.max_redirects} redirects")


def _decode_data_uri(ref: str, settings: Settings) -> bytes:
    header, comma, payload = ref.partition(",")
    if not comma:
        raise InvalidInput("malformed data URI: no comma before the data")
    media, *params = header[len("data:") :].split(";")
    if not media.lower().startswith("image/"):
        raise InvalidInput("a data URI must carry an image/... media type")
    if "base64" not in (p.strip().lower() for p in params):
        raise InvalidInput("a data URI must be base64-encoded (data:image/...;base64,...)")
    limit = settings.max_data_uri_bytes
    # Base64 is 4/3 of the data plus line breaks: a payload over twice the limit cannot fit,
    # and refusing it here spares decoding it.
    if len(payload) > 2 * limit + 1024:
        raise too_big("the data URI", limit)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("the data URI is not valid base64") from None
    if len(data) > limit:
        raise too_big("the data URI", limit)
    return data


def _read_file(ref: str, settings: Settings) -> bytes:
    if not settings.allow_local_files:
        raise ForbiddenUrl("file:// references are not allowed in this deployment")
    path = file_uri_path(ref)
    if not path.is_file():
        raise InputFetchFailed(f"{ref}: no such file")
    try:
        with path.open("rb") as handle:
            data = handle.read(settings.max_image_bytes + 1)
    except OSError as exc:
        raise InputFetchFailed(f"{ref}: {exc.strerror or exc}") from None
    if len(data) > settings.max_image_bytes:
        raise too_big("the file", settings.max_image_bytes)
    return data


def fetch_bytes(
    ref: str,
    settings: Settings,
    storage: Storage | None = None,
    *,
    deadline_s: float | None = None,
) -> bytes:
    """The raw bytes behind an image reference, within every limit in ``settings``."""
    scheme = ref.partition(":")[0].lower() if ":" in ref else ""
    if scheme in ("http", "https"):
        seconds = settings.fetch_timeout_s if deadline_s is None else deadline_s
        return _fetch_http(ref, settings, seconds)
    if scheme == "data":
        return _decode_data_uri(ref, settings)
    if scheme == "file":
        return _read_file(ref, settings)
    if scheme in ("s3", "storage"):
        store = storage if storage is not None else open_storage(settings)
        cap = settings.max_image_bytes
        try:
            # Storage stops reading one chunk past the cap: a huge object is never read
            # whole.
            if scheme == "s3":
                data = store.read_uri(ref, cap)
            else:
                # An upload (api_client.uploads): a key under uploads/ of this deployment's
                # own storage, whatever its backend; nothing else there can be named.
                try:
                    key = ref_key(ref)
                except InvalidInput as exc:
                    raise ForbiddenUrl(exc.message) from None
                data = store.get(key, cap)
        except (InputFetchFailed, StorageError) as exc:
            # No such key, no such bucket, access denied: one answer, so a job cannot
            # probe which buckets exist; the operator's log keeps which it was.
            log.warning("reading %s: %s", redact_ref(ref), exc.message)
            raise InputFetchFailed(
                f"{redact_ref(ref)}: cannot read it (it does not exist, or this deployment "
                "may not read it)"
            ) from None
        if len(data) > settings.max_image_bytes:
            raise too_big("the object", settings.max_image_bytes)
        return data
    raise ForbiddenUrl(
        f"unsupported image reference scheme {scheme!r}: use s3://, https://, http://, "
        "data:image/..., storage://uploads/... or file:// (where allowed)"
    )


# --- decoding ----------------------------------------------------------------------

# Modes Image.reduce() works in; others (palette, 1-bit, CMYK...) become RGB first.
_REDUCIBLE = frozenset({"L", "LA", "RGB", "RGBA", "RGBa", "La", "I", "F"})


def _open(data: bytes) -> Image.Image:
    """Pillow's lazy open: the header only, no pixels decoded."""
    if not data:
        raise InvalidInput("the image is empty (0 bytes)")
    try:
        return Image.open(BytesIO(data), formats=list(FORMATS))
    except UnidentifiedImageError:
        raise InvalidInput("not a JPEG, PNG, WebP, GIF or BMP image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"image has too many pixels: {exc}") from None
    except Exception as exc:  # PIL raises many types (SyntaxError, struct.error, ...)
        raise InvalidInput(f"could not read the image header: {exc}") from None


def _check_size(width: int, height: int, settings: Settings) -> None:
    if width <= 0 or height <= 0:
        raise InvalidInput(f"image has an empty size {width}x{height}")
    if width * height > settings.max_image_pixels:
        raise InvalidInput(
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{settings.max_image_pixels}"
        )


def header_size(data: bytes, settings: Settings) -> tuple[int, int]:
    """(width, height) from the image's header, within the pixel cap; nothing decoded."""
    size = image_size(data)
    if size is None:  # a header the light reader does not know: Pillow's lazy open
        with _open(data) as opened:
            size = opened.size
    _check_size(*size, settings)
    return size


def _reduced(image: Image.Image, min_side: int) -> Image.Image:
    """``image`` shrunk by a whole factor while both sides stay at least ``min_side``."""
    factor = min(image.width // min_side, image.height // min_side)
    if factor < 2:
        return image
    if image.mode not in _REDUCIBLE:
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    return image.reduce(factor)


def decode_image(data: bytes, settings: Settings, min_side: int | None = None) -> Image.Image:
    """Decode one image to RGB: allowed formats only, pixel cap before decoding, EXIF applied.

    Animated GIF/WebP/PNG give their first frame. ``min_side``: what the caller needs;
    the image is reduced while decoding (JPEG: DCT scaling, 1/2 to 1/8) or right after
    it, by whole factors only, so that both sides stay at least ``min_side`` (or as
    they were when smaller). The full-size RGB copy of a large photo is never made.
    """
    opened = _open(data)
    with opened:
        _check_size(*opened.size, settings)
        try:
            if min_side is not None and opened.format == "JPEG":
                # Before load(): libjpeg then decodes at 1/2, 1/4 or 1/8 scale, each side
                # still at least min_side.
                opened.draft("RGB", (min_side, min_side))
            # load() decodes the current frame only, so a GIF's other frames are never read.
            opened.load()
            image: Image.Image = opened
            if min_side is not None:
                image = _reduced(image, min_side)
            upright = ImageOps.exif_transpose(image)
            return upright.convert("RGB")
        except Exception as exc:
            raise InvalidInput(
                f"the {opened.format} image is corrupt or truncated: {exc}"
            ) from None


def load_image(
    ref: str, settings: Settings, storage: Storage | None = None, min_side: int | None = None
) -> Image.Image:
    """Fetch and decode one image reference (``min_side``: see ``decode_image``)."""
    return decode_image(fetch_bytes(ref, settings, storage), settings, min_side)
