"""Image references: the URL guard, inline and local sources, and hostile image files.

Nothing here opens a connection: the resolver is a fake and any connect() fails the test.
"""

from __future__ import annotations

import base64
import io
import socket
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import GifImagePlugin, Image

from imageq.api_client.errors import ForbiddenUrl, InputFetchFailed, InvalidInput
from imageq.api_client.redact import redact_ref
from imageq.api_client.settings import Settings
from imageq.workers.io import netguard
from imageq.workers.io.images import check_url, decode_image, fetch_bytes, load_image
from imageq.workers.io.storage import LocalStorage

STRICT = Settings()
LOOSE = Settings(allow_private_urls=True)

# What the fake resolver knows; every other name fails as if it did not exist.
FAKE_DNS = {
    "public.test": ["93.184.216.34"],
    "mixed.test": ["93.184.216.34", "10.1.2.3"],
    "v6private.test": ["fd00::5"],
    "localhost": ["127.0.0.1", "::1"],
}


def fake_getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
    if host not in FAKE_DNS:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    out = []
    for address in FAKE_DNS[host]:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sockaddr = (address, port or 80, 0, 0) if family == socket.AF_INET6 else (address, 80)
        out.append((family, socket.SOCK_STREAM, 6, "", sockaddr))
    return out


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netguard, "_getaddrinfo", fake_getaddrinfo)

    def refuse(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"unit test tried to connect to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def noisy(size: tuple[int, int] = (96, 96)) -> Image.Image:
    # Noise does not compress, so cutting the file short really cuts into the pixel data.
    return Image.effect_noise(size, 80).convert("RGB")


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a huge image, with almost no pixel data behind it."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


# --- decode_image --------------------------------------------------------------------


def test_decodes_a_valid_jpeg_to_rgb() -> None:
    image = decode_image(encode(noisy(), "JPEG"), STRICT)
    assert image.mode == "RGB" and image.size == (96, 96)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: encode(noisy(), "JPEG")[:1500], id="truncated-jpeg"),
        pytest.param(
            lambda: encode(noisy(), "JPEG")[:300] + bytes(range(256)) * 20, id="corrupt-jpeg"
        ),
        pytest.param(lambda: encode(noisy(), "PNG")[:2000], id="truncated-png"),
    ],
)
def test_truncated_or_corrupt_files_are_invalid_input(make: Callable[[], bytes]) -> None:
    with pytest.raises(InvalidInput, match="corrupt or truncated"):
        decode_image(make(), STRICT)


def test_png_with_a_damaged_data_chunk_is_invalid_input() -> None:
    data = bytearray(encode(noisy(), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start + 100 : start + 110] = b"\xff" * 10
    with pytest.raises(InvalidInput):
        decode_image(bytes(data), STRICT)


def test_zero_bytes_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="empty"):
        decode_image(b"", STRICT)


def test_header_claiming_a_huge_size_is_refused_before_decoding() -> None:
    # 30000 x 30000 = 900 M pixels: PIL's own bomb check fires first.
    with pytest.raises(InvalidInput, match="pixels"):
        decode_image(png_claiming(30_000, 30_000), STRICT)


def test_pixel_cap_is_checked_before_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load(self: Image.Image) -> None:
        raise AssertionError("load() ran before the pixel check")

    monkeypatch.setattr(Image.Image, "load", no_load)
    data = png_claiming(5_000, 5_000)  # 25 M pixels: under PIL's limit, over ours
    with pytest.raises(InvalidInput, match="over the limit of 1000000"):
        decode_image(data, STRICT.with_(max_image_pixels=1_000_000))


def test_a_solid_image_over_a_small_pixel_cap_is_refused() -> None:
    data = encode(Image.new("RGB", (200, 200), (9, 9, 9)), "PNG")
    assert decode_image(data, STRICT.with_(max_image_pixels=40_000)).size == (200, 200)
    with pytest.raises(InvalidInput, match="40000 pixels"):
        decode_image(data, STRICT.with_(max_image_pixels=39_999))


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nshowpage\n%%EOF\n"
PDF = b"%PDF-1.4\n1 0 obj<< /Type /Catalog >>endobj\ntrailer<< /Root 1 0 R >>\n%%EOF\n"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'


@pytest.mark.parametrize("data", [EPS, PDF, SVG], ids=["eps", "pdf", "svg"])
def test_other_formats_named_png_are_refused(data: bytes, tmp_path: Path) -> None:
    disguised = tmp_path / "picture.png"
    disguised.write_bytes(data)
    settings = STRICT.with_(allow_local_files=True)
    with pytest.raises(InvalidInput, match="not a JPEG, PNG, WebP, GIF or BMP"):
        load_image(disguised.as_uri(), settings)


def test_eps_sample_is_one_pil_would_otherwise_open() -> None:
    # Keeps the refusal test honest: without the format allowlist PIL takes this file.
    assert Image.open(io.BytesIO(EPS)).format == "EPS"


def test_animated_gif_gives_its_first_frame_without_reading_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    colors = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]
    frames = [Image.new("RGB", (32, 32), colors[i % 3]) for i in range(3000)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=20)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3000
    seeks: list[int] = []
    real_seek = GifImagePlugin.GifImageFile.seek

    def counting_seek(self: GifImagePlugin.GifImageFile, frame: int) -> None:
        seeks.append(frame)
        real_seek(self, frame)

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "seek", counting_seek)
    started = time.perf_counter()
    image = decode_image(data, STRICT)
    assert time.perf_counter() - started < 1.0
    assert [f for f in seeks if f > 0] == []
    assert image.mode == "RGB" and image.size == (32, 32)
    pixel = image.getpixel((16, 16))
    assert isinstance(pixel, tuple)
    assert pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60


def test_exif_orientation_is_applied() -> None:
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image = decode_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95), STRICT)
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert isinstance(top, tuple) and isinstance(bottom, tuple)
    assert top[0] > 200 and top[2] < 60  # the stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGBA", (8, 8), (10, 20, 30, 128)),
        Image.new("LA", (8, 8), (77, 255)),
        Image.new("P", (8, 8), 3),
        Image.new("L", (8, 8), 99),
    ],
    ids=["RGBA", "LA", "P", "L"],
)
def test_every_mode_becomes_rgb(image: Image.Image) -> None:
    decoded = decode_image(encode(image, "PNG"), STRICT)
    assert decoded.mode == "RGB" and decoded.size == (8, 8)


def test_webp_and_bmp_are_accepted() -> None:
    for fmt in ("WEBP", "BMP"):
        assert decode_image(encode(noisy((16, 16)), fmt), STRICT).size == (16, 16)


# --- fetch_bytes: inline, local and unknown sources --------------------------------


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def test_data_uri_round_trips() -> None:
    data = encode(noisy((16, 16)), "PNG")
    assert fetch_bytes(data_uri(data), STRICT) == data
    assert load_image(data_uri(data), STRICT).size == (16, 16)


def test_data_uri_over_the_cap_is_invalid_input() -> None:
    settings = STRICT.with_(max_data_uri_bytes=1000)
    assert len(fetch_bytes(data_uri(b"x" * 1000), settings)) == 1000
    with pytest.raises(InvalidInput, match="larger than the limit of 1000 bytes"):
        fetch_bytes(data_uri(b"x" * 1001), settings)
    with pytest.raises(InvalidInput, match="larger than"):
        fetch_bytes(data_uri(b"x" * 100_000), settings)


@pytest.mark.parametrize(
    "ref",
    [
        "data:image/png;base64,iVBOR!!!not-base64",
        "data:image/png;base64,abc",  # bad padding
        "data:image/png,rawbytes",  # not base64 at all
        "data:text/html;base64,PGgxPmhpPC9oMT4=",
        "data:image/png;base64",
    ],
)
def test_malformed_data_uris_are_invalid_input(ref: str) -> None:
    with pytest.raises(InvalidInput):
        fetch_bytes(ref, STRICT)


def test_file_urls_need_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(b"pixels")
    with pytest.raises(ForbiddenUrl):
        fetch_bytes(path.as_uri(), STRICT)
    allowed = STRICT.with_(allow_local_files=True)
    assert fetch_bytes(path.as_uri(), allowed) == b"pixels"
    with pytest.raises(InputFetchFailed):
        fetch_bytes((tmp_path / "missing.png").as_uri(), allowed)
    with pytest.raises(InvalidInput, match="larger than"):
        fetch_bytes(path.as_uri(), allowed.with_(max_image_bytes=3))
    with pytest.raises(InvalidInput):
        fetch_bytes("file:" + str(path), allowed)  # one slash: not a file:// URI


@pytest.mark.parametrize(
    "ref", ["gopher://127.0.0.1:70/_x", "ftp://public.test/a.png", "javascript:alert(1)", "a.png"]
)
def test_other_schemes_are_forbidden(ref: str) -> None:
    with pytest.raises(ForbiddenUrl):
        fetch_bytes(ref, LOOSE.with_(allow_local_files=True))


class FakeStorage(LocalStorage):
    def __init__(self, data: bytes, root: Path) -> None:
        super().__init__(root)
        self.data = data
        self.read: list[str] = []

    def read_uri(self, uri: str, max_bytes: int | None = None) -> bytes:
        self.read.append(uri)
        return self.data


def test_s3_refs_go_through_storage_with_the_byte_cap(tmp_path: Path) -> None:
    storage = FakeStorage(b"12345", tmp_path)
    assert fetch_bytes("s3://b/k.png", STRICT, storage) == b"12345"
    assert storage.read == ["s3://b/k.png"]
    with pytest.raises(InvalidInput):
        fetch_bytes("s3://b/k.png", STRICT.with_(max_image_bytes=4), storage)


# --- check_url -------------------------------------------------------------------------

PRIVATE_URLS = [
    "http://127.0.0.1/",
    "http://127.9.9.9:8080/x",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://0177.0.0.1/",
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://172.31.255.255/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://224.0.0.1/",
    "http://240.0.0.1/",
    "http://100.100.100.200/",  # carrier-grade NAT, a cloud metadata address
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
    "http://[2002:a9fe:a9fe::]/",  # 6to4 of 169.254.169.254
    "https://localhost/",
    "http://mixed.test/",  # one public address is not enough: every one must be
    "http://v6private.test/",
]


@pytest.mark.parametrize("url", PRIVATE_URLS)
def test_private_addresses_are_refused(url: str) -> None:
    with pytest.raises(ForbiddenUrl):
        check_url(url, STRICT)


@pytest.mark.parametrize("url", PRIVATE_URLS)
def test_private_addresses_are_allowed_when_configured(url: str) -> None:
    check_url(url, LOOSE)


@pytest.mark.parametrize(
    "url", ["http://93.184.216.34/a.png", "https://public.test/a.png", "http://[2606:4700::1]/"]
)
def test_public_addresses_pass(url: str) -> None:
    check_url(url, STRICT)


@pytest.mark.parametrize(
    "url", ["gopher://public.test/", "file:///etc/passwd", "ftp://public.test/", "//public.test/"]
)
def test_only_http_and_https_pass_even_when_private_is_allowed(url: str) -> None:
    with pytest.raises(ForbiddenUrl):
        check_url(url, LOOSE)


def test_names_that_do_not_resolve_fail_to_fetch() -> None:
    with pytest.raises(InputFetchFailed, match="could not resolve"):
        check_url("https://nxdomain.test/a.png", STRICT)


def test_malformed_urls_are_refused() -> None:
    for url in ("http://public.test:99999/", "http://[::1/", "http:///nohost"):
        with pytest.raises(ForbiddenUrl):
            check_url(url, STRICT)


# --- redact_ref ------------------------------------------------------------------------


def test_redact_ref_hides_payloads_queries_and_passwords() -> None:
    payload = bytes(range(256)) * 48 + b"abc"  # 12291 bytes: exercises the padding count
    assert redact_ref(data_uri(payload)) == "data:image/png;base64,…(12291 bytes)"
    signed = "https://user:pw@bucket.test/a.png?X-Amz-Signature=secret#frag"
    assert redact_ref(signed) == "https://bucket.test/a.png"
    assert redact_ref("s3://bucket/key.png?versionId=3") == "s3://bucket/key.png"
    assert len(redact_ref("x" * 5000)) < 130
