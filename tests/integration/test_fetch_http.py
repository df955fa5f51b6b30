"""fetch_bytes against a real HTTP server on loopback: redirects, caps, deadlines, the guard.

Every connect() is checked: a test that tries to reach anything but loopback fails.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from imageq.api_client.errors import ForbiddenUrl, InputFetchFailed, InvalidInput
from imageq.api_client.settings import Settings
from imageq.workers.io import netguard
from imageq.workers.io.images import fetch_bytes, load_image

LOOSE = Settings(allow_private_urls=True, fetch_timeout_s=5.0)
STRICT = Settings(allow_private_urls=False, fetch_timeout_s=5.0)
CAP = 10_000


def make_png() -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (0, 128, 255)).save(buf, format="PNG")
    return buf.getvalue()


PNG = make_png()


class Server:
    def __init__(self) -> None:
        self.hits: list[str] = []
        self.stop = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return

            def redirect(self, location: str | None) -> None:
                self.send_response(302)
                if location is not None:
                    self.send_header("location", location)
                self.send_header("content-length", "0")
                self.end_headers()

            def trickle(self, data: bytes) -> None:
                # One byte at a time, forever: only a total deadline ends this.
                try:
                    while not owner.stop.is_set():
                        self.wfile.write(data)
                        self.wfile.flush()
                        time.sleep(0.05)
                except OSError:
                    return

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                path, query = parts.path, parse_qs(parts.query)
                owner.hits.append(path)
                if path == "/image.png":
                    self.send_response(200)
                    self.send_header("content-type", "image/png")
                    self.send_header("content-length", str(len(PNG)))
                    self.end_headers()
                    self.wfile.write(PNG)
                elif path.startswith("/r/"):
                    left = int(path.rsplit("/", 1)[1])
                    self.redirect(f"/r/{left - 1}" if left > 1 else "/image.png")
                elif path == "/relative/step":
                    self.redirect("../image.png")
                elif path == "/loop":
                    self.redirect("/loop")
                elif path == "/no-location":
                    self.redirect(None)
                elif path == "/to-metadata":
                    self.redirect("http://169.254.169.254/latest/meta-data/iam/")
                elif path == "/to-host":
                    host = query["host"][0]
                    self.redirect(f"http://{host}:{owner.port}/image.png")
                elif path == "/big":
                    self.send_response(200)
                    self.end_headers()  # no content-length: only streaming can count
                    self.wfile.write(b"\0" * (CAP + 1))
                elif path == "/big-declared":
                    self.send_response(200)
                    self.send_header("content-length", str(CAP * 1000))
                    self.end_headers()
                    self.trickle(b"\0")
                elif path == "/trickle":
                    self.send_response(200)
                    self.send_header("content-type", "image/png")
                    self.end_headers()
                    self.trickle(b"\0")
                elif path == "/slow-headers":
                    self.wfile.write(b"HTTP/1.0 200 OK\r\n")
                    self.trickle(b"x")
                else:
                    self.send_error(404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.httpd.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.stop.set()
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Records the test thread's connect() calls and fails any, from any thread, that is
    not to loopback.

    Only the test's own thread is recorded: fetch_bytes connects on the caller's thread,
    while a background thread left by an earlier test (a webhook retry, a client
    reconnecting) may dial a port that the OS has since handed to this module's server.
    """
    attempts: list[Any] = []
    real_connect = socket.socket.connect
    test_thread = threading.get_ident()

    def connect(self: socket.socket, address: Any) -> None:
        if threading.get_ident() == test_thread:
            attempts.append(address)
        host = address[0] if isinstance(address, tuple) else ""
        if not ipaddress.ip_address(host).is_loopback:
            raise AssertionError(f"test tried to connect to {address}")
        real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


@pytest.fixture
def loopback_is_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Treat exactly 127.0.0.1 as a public address, so the strict guard can be exercised
    against the loopback test server; every other address keeps the real policy."""
    real = netguard._refusal

    def refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        return None if str(address) == "127.0.0.1" else real(address)

    monkeypatch.setattr(netguard, "_refusal", refusal)


def fake_resolver(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> dict[str, int]:
    """Names resolve to ``answers[name]`` in turn (the last repeats); returns call counts."""
    calls: dict[str, int] = {}

    def getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        seen = calls.get(host, 0)
        calls[host] = seen + 1
        address = answers[host][min(seen, len(answers[host]) - 1)]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port or 80))]

    monkeypatch.setattr(netguard, "_getaddrinfo", getaddrinfo)
    return calls


def test_fetches_and_decodes_a_png(server: Server) -> None:
    assert fetch_bytes(server.url("/image.png"), LOOSE) == PNG
    assert load_image(server.url("/image.png"), LOOSE).size == (24, 16)


def test_http_errors_fail_with_the_status(server: Server) -> None:
    with pytest.raises(InputFetchFailed, match="HTTP 404"):
        fetch_bytes(server.url("/missing.png"), LOOSE)


def test_strict_guard_refuses_the_loopback_server_itself(
    server: Server, loopback_only: list[Any]
) -> None:
    hits_before = list(server.hits)
    with pytest.raises(ForbiddenUrl, match="loopback"):
        fetch_bytes(server.url("/image.png"), STRICT)
    assert loopback_only == [] and server.hits == hits_before


def test_redirects_are_followed_up_to_the_limit(server: Server) -> None:
    assert fetch_bytes(server.url("/r/3"), LOOSE.with_(max_redirects=3)) == PNG
    assert fetch_bytes(server.url("/relative/step"), LOOSE) == PNG
    with pytest.raises(InputFetchFailed, match="more than 2 redirects"):
        fetch_bytes(server.url("/r/3"), LOOSE.with_(max_redirects=2))
    with pytest.raises(InputFetchFailed, match="redirects"):
        fetch_bytes(server.url("/loop"), LOOSE)
    with pytest.raises(InputFetchFailed, match="Location"):
        fetch_bytes(server.url("/no-location"), LOOSE)


def test_redirect_to_the_metadata_address_is_refused_without_connecting(
    server: Server, loopback_only: list[Any], loopback_is_public: None
) -> None:
    # The first hop passes the strict guard (control), so the refusal is the second hop's.
    assert fetch_bytes(server.url("/image.png"), STRICT) == PNG
    server.hits.clear()
    with pytest.raises(ForbiddenUrl, match=r"169\.254\.169\.254"):
        fetch_bytes(server.url("/to-metadata"), STRICT)
    assert server.hits == ["/to-metadata"]
    assert loopback_only and all(address[0] == "127.0.0.1" for address in loopback_only)


def test_redirect_to_a_name_that_resolves_privately_is_refused(
    server: Server, monkeypatch: pytest.MonkeyPatch, loopback_is_public: None
) -> None:
    calls = fake_resolver(monkeypatch, {"metadata.test": ["169.254.169.254"]})
    with pytest.raises(ForbiddenUrl, match=r"metadata\.test"):
        fetch_bytes(server.url("/to-host?host=metadata.test"), STRICT)
    assert calls == {"metadata.test": 1}


def test_connection_goes_to_the_vetted_address(
    server: Server, monkeypatch: pytest.MonkeyPatch, loopback_is_public: None
) -> None:
    # "vetted.test" exists only in the guard's resolver: fetching it works only if the
    # connection uses the address the guard checked.
    fake_resolver(monkeypatch, {"vetted.test": ["127.0.0.1"]})
    assert fetch_bytes(f"http://vetted.test:{server.port}/image.png", STRICT) == PNG


def test_dns_rebinding_between_check_and_connect_is_refused(
    server: Server,
    monkeypatch: pytest.MonkeyPatch,
    loopback_only: list[Any],
    loopback_is_public: None,
) -> None:
    calls = fake_resolver(monkeypatch, {"rebind.test": ["127.0.0.1", "169.254.169.254"]})
    server.hits.clear()
    with pytest.raises(ForbiddenUrl, match=r"169\.254\.169\.254"):
        fetch_bytes(f"http://rebind.test:{server.port}/image.png", STRICT)
    assert calls["rebind.test"] == 2  # once for check_url, once at connect
    assert server.hits == [] and loopback_only == []


def test_body_over_the_cap_is_refused_while_streaming(server: Server) -> None:
    settings = LOOSE.with_(max_image_bytes=CAP)
    with pytest.raises(InvalidInput, match=f"limit of {CAP} bytes"):
        fetch_bytes(server.url("/big"), settings)
    assert len(fetch_bytes(server.url("/big"), settings.with_(max_image_bytes=CAP + 1))) == CAP + 1


def test_declared_oversize_is_refused_before_reading(server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(InvalidInput, match="larger than"):
        fetch_bytes(server.url("/big-declared"), LOOSE.with_(max_image_bytes=CAP))
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("path", ["/trickle", "/slow-headers"])
def test_a_server_that_never_finishes_fails_within_the_deadline(server: Server, path: str) -> None:
    started = time.monotonic()
    with pytest.raises(InputFetchFailed, match="deadline"):
        fetch_bytes(server.url(path), LOOSE.with_(fetch_timeout_s=1.0))
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 2.0


def test_deadline_argument_overrides_the_setting(server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(InputFetchFailed, match="deadline"):
        fetch_bytes(server.url("/trickle"), LOOSE.with_(fetch_timeout_s=30.0), deadline_s=0.5)
    assert time.monotonic() - started < 1.5


def test_connection_refused_fails_to_fetch() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens there
    with pytest.raises(InputFetchFailed):
        fetch_bytes(f"http://127.0.0.1:{port}/a.png", LOOSE)
