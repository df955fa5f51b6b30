"""Small builders shared by the tests: images as bytes and data URIs, an image server."""

from __future__ import annotations

import base64
import io
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

RGB = tuple[int, int, int]


def png_bytes(color: RGB = (200, 30, 30), size: tuple[int, int] = (48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def cells(seed: int) -> Image.Image:
    """A 6x6 grid of random colours: a distinct image for each seed."""
    rng = random.Random(seed)
    image = Image.new("RGB", (48, 48))
    for y in range(6):
        for x in range(6):
            colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
            image.paste(colour, (x * 8, y * 8, x * 8 + 8, y * 8 + 8))
    return image


def cells_png(seed: int) -> bytes:
    buf = io.BytesIO()
    cells(seed).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_uri(color: RGB = (200, 30, 30), size: tuple[int, int] = (48, 40)) -> str:
    return data_uri(png_bytes(color, size))


def bomb_png() -> bytes:
    """A small PNG whose header claims 30000 x 30000 pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (30000 * 3 + 1) * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


class ImageServer:
    """Serves ``files[path]``; ``slow[path]`` seconds of trickling before the body ends."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.slow: dict[str, float] = {}
        self.hits: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                body = server.files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("content-type", "image/png")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                delay = server.slow.get(self.path, 0.0)
                if delay:
                    half = len(body) // 2
                    self.wfile.write(body[:half])
                    self.wfile.flush()
                    time.sleep(delay)
                    self.wfile.write(body[half:])
                else:
                    self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@contextmanager
def image_server() -> Iterator[ImageServer]:
    srv = ImageServer()
    thread = threading.Thread(target=srv.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
