"""Width and height from an image's header, for the light client's pixel cap check."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from imageq.api_client.image_header import image_size


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("PNG", {}),
        ("JPEG", {"quality": 85}),
        ("JPEG", {"progressive": True}),
        ("GIF", {}),
        ("BMP", {}),
        ("WEBP", {"lossless": True}),
        ("WEBP", {"quality": 80}),
    ],
)
def test_size_of_every_accepted_format(fmt: str, options: dict) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (321, 123), (10, 200, 30)).save(buf, format=fmt, **options)
    assert image_size(buf.getvalue()) == (321, 123)


def test_jpeg_with_exif_before_the_frame() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the header still gives the stored size
    buf = io.BytesIO()
    Image.new("RGB", (640, 480)).save(buf, format="JPEG", exif=exif.tobytes())
    assert image_size(buf.getvalue()) == (640, 480)


@pytest.mark.parametrize("data", [b"", b"not an image", b"\xff\xd8\xff\xe0\x00", b"\x89PNG\r\n"])
def test_unreadable_headers_give_none(data: bytes) -> None:
    assert image_size(data) is None
