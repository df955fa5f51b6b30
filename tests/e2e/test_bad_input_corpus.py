"""A corpus of hostile and malformed jobs against one long-lived worker per kind (a
caption worker, and a diffusion worker for the generate/inpaint/style cases).

Every case goes in twice: through the Client (which either accepts it or refuses it
with ``InvalidInput`` naming the field) and as a raw Celery message by task name, as a
backend in another language could send it. Each must end with its error code while the
worker survives (same pid, same registry entry) and its warm model serves the next good
job. The worker runs with the URL guard ON (``IMAGEQ_ALLOW_PRIVATE_URLS=0``).

The worker's network is simulated by a ``sitecustomize`` module on its PYTHONPATH: the
name ``images.example`` resolves to a public address that is routed to this module's
loopback image server, ``mixed.example`` resolves to that public address AND a private
one, and every other connection to a non-loopback address is refused and written to a
log. The guard has to refuse before connecting: the tests assert that log stays empty.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Connection, Producer
from PIL import Image

from imageq.api_client.errors import InvalidInput
from imageq.api_client.names import task_name
from imageq.workers.testing.services import WorkerProcess, wait_until
from tests.fixtures.services import Stack
from tests.helpers import bomb_png, data_uri, png_bytes, png_uri

PUBLIC_IP = "93.184.215.14"  # example.com's: global, so the guard lets it pass
PRIVATE_IP = "10.0.0.7"
WORKER = "caption-corpus@test"
DIFFUSION_WORKER = "diffusion-corpus@test"

NETSIM = '''
"""Test-only network for one worker process (written by test_bad_input_corpus.py)."""
import ipaddress
import json
import os
import socket

_CONFIG = json.loads(os.environ.get("NETSIM_CONFIG", "{}"))
_HOSTS = {k.lower(): v for k, v in _CONFIG.get("hosts", {}).items()}
_ROUTES = _CONFIG.get("routes", {})
_LOG = _CONFIG.get("log", "")
_real_getaddrinfo = socket.getaddrinfo
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _note(line):
    if _LOG:
        with open(_LOG, "a") as sink:
            sink.write(line + "\\n")


def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
    name = host.decode() if isinstance(host, bytes) else host
    if isinstance(name, str) and name.lower() in _HOSTS:
        found = []
        for address in _HOSTS[name.lower()]:
            fam = socket.AF_INET6 if ":" in address else socket.AF_INET
            if family in (0, fam):
                where = (address, int(port or 0)) + ((0, 0) if ":" in address else ())
                found.append((fam, socket.SOCK_STREAM, 6, "", where))
        return found
    return _real_getaddrinfo(host, port, family, type, proto, flags)


def _loopback(host):
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        infos = _real_getaddrinfo(host, None)
        return bool(infos) and all(_loopback(str(info[4][0])) for info in infos)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _target(sock, address):
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple):
        return address
    host = str(address[0])
    if host in _ROUTES:
        _note("routed %s:%s" % (host, address[1]))
        return (_ROUTES[host],) + tuple(address[1:2])
    if _loopback(host):
        return address
    _note("REFUSED %s:%s" % (host, address[1]))
    raise ConnectionRefusedError("netsim: no connections to non-loopback addresses")


def connect(self, address):
    return _real_connect(self, _target(self, address))


def connect_ex(self, address):
    return _real_connect_ex(self, _target(self, address))


socket.getaddrinfo = getaddrinfo
socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
'''


# --- the hostile files ---------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def _noise() -> Image.Image:
    # Noise does not compress, so a cut really lands in the pixel data.
    return Image.effect_noise((96, 96), 80).convert("RGB")


def truncated_jpeg() -> bytes:
    return _encode(_noise(), "JPEG")[:1500]


def corrupt_png() -> bytes:
    data = bytearray(_encode(_noise(), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start + 100 : start + 110] = b"\xff" * 10
    return bytes(data)


def gif_with_frames(count: int) -> bytes:
    colors = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]
    frames = [Image.new("RGB", (16, 16), colors[i % 3]) for i in range(count)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=20)


def png_of_size(width: int, height: int) -> bytes:
    """A valid PNG header for a big image with almost no pixel data behind it."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nshowpage\n%%EOF\n"
PDF = b"%PDF-1.4\n1 0 obj<< /Type /Catalog >>endobj\ntrailer<< /Root 1 0 R >>\n%%EOF\n"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'


# --- a loopback image server: files, redirects, a body that never ends --------------


class ImageHost:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.endless: set[str] = set()
        self.hits: dict[str, int] = {}
        self._lock = threading.Lock()
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with host._lock:
                    host.hits[self.path] = host.hits.get(self.path, 0) + 1
                if self.path in host.redirects:
                    self.send_response(302)
                    self.send_header("Location", host.redirects[self.path])
                    self.send_header("content-length", "0")
                    self.end_headers()
                elif self.path in host.endless:
                    self._trickle()
                elif self.path in host.files:
                    body = host.files[self.path]
                    self.send_response(200)
                    self.send_header("content-type", "image/png")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()

            def _trickle(self) -> None:
                # One byte at a time, never the whole body: only a total deadline ends it.
                self.send_response(200)
                self.send_header("content-length", "1000000")
                self.end_headers()
                for _ in range(200):
                    try:
                        self.wfile.write(b"\x89")
                        self.wfile.flush()
                    except OSError:
                        return
                    time.sleep(0.2)

            def log_message(self, *args: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])

    def total_hits(self) -> int:
        with self._lock:
            return sum(self.hits.values())


@pytest.fixture(scope="module")
def host() -> Iterator[ImageHost]:
    srv = ImageHost()
    srv.files.update(
        {
            "/good.png": png_bytes((20, 140, 60)),
            "/truncated.jpg": truncated_jpeg(),
            "/corrupt.png": corrupt_png(),
            "/zero.png": b"",
            "/bomb.png": bomb_png(),
            "/big.png": png_of_size(8000, 8000),
            "/eps.png": EPS,
            "/pdf.png": PDF,
            "/svg.png": SVG,
            "/frames.gif": gif_with_frames(3000),
        }
    )
    srv.redirects["/to-metadata"] = "http://169.254.169.254/latest/meta-data/iam/"
    srv.redirects["/to-localhost"] = f"http://localhost:{srv.port}/good.png"
    srv.redirects["/to-private"] = f"http://{PRIVATE_IP}/good.png"
    srv.endless.add("/endless.png")
    thread = threading.Thread(target=srv.httpd.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@dataclass
class Corpus:
    stack: Stack
    workers: dict[str, WorkerProcess]
    netlog: Path
    celery: Celery
    # Each worker's registry entry when the corpus began: pid, start time, model load.
    registry: dict[str, dict[str, Any]] = field(default_factory=dict)

    def registry_entry(self, name: str) -> dict[str, Any]:
        raw = self.stack.redis.get(self.stack.store.keys.worker(name))
        assert raw is not None, f"{name} left the registry"
        entry: dict[str, Any] = json.loads(raw)
        return entry

    def refused_connections(self) -> list[str]:
        if not self.netlog.exists():
            return []
        return [line for line in self.netlog.read_text().splitlines() if "REFUSED" in line]


@pytest.fixture(scope="module")
def corpus(
    make_stack: Callable[..., Stack],
    tiny_caption_model: Path,
    tiny_sd_model: Path,
    host: ImageHost,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Corpus]:
    shim = tmp_path_factory.mktemp("netsim")
    (shim / "sitecustomize.py").write_text(NETSIM)
    netlog = shim / "connections.log"
    config = {
        "hosts": {"images.example": [PUBLIC_IP], "mixed.example": [PUBLIC_IP, PRIVATE_IP]},
        "routes": {PUBLIC_IP: "127.0.0.1"},
        "log": str(netlog),
    }
    path = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p)
    stack = make_stack(
        IMAGEQ_MODEL_CAPTION=str(tiny_caption_model),
        IMAGEQ_MODEL_DIFFUSION=str(tiny_sd_model),
        IMAGEQ_ALLOW_PRIVATE_URLS="0",
        IMAGEQ_FETCH_TIMEOUT_S="2",
        PYTHONPATH=path,
        NETSIM_CONFIG=json.dumps(config),
    )
    # Started together, so that their model loads overlap.
    workers = {
        name: stack.worker(kind, name, ready=False)
        for kind, name in (("caption", WORKER), ("diffusion", DIFFUSION_WORKER))
    }
    for name, worker in workers.items():
        worker.wait_ready(stack.redis, stack.store.keys.worker(name))
    app = Celery("corpus-backend", broker=stack.settings.broker_url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"])
    found = Corpus(stack, workers, netlog, app)
    found.registry = {name: found.registry_entry(name) for name in workers}
    yield found
    app.close()


# --- the table -----------------------------------------------------------------------

IMG = "http://images.example:{port}"
MIXED = "http://mixed.example:{port}/good.png"


@dataclass(frozen=True)
class Case:
    id: str
    # The final status's error code, or "succeeded" for input that is merely odd.
    code: str
    input: Any
    # The field the Client's InvalidInput names; None when the Client accepts the job.
    refused: str | None = None
    kind: str = "caption"
    # Document-level fields beside id/kind/input (priority, timeout_s, unknown ones).
    doc: dict[str, Any] = field(default_factory=dict)
    # The field the worker's error message names (defaults to ``refused``).
    names: str | None = None
    # False where the Client cannot even express the document (raw message only).
    via_client: bool = True


def _img(path: str) -> dict[str, Any]:
    return {"image": IMG + path}


def good(**fields: Any) -> dict[str, Any]:
    """A valid caption input with ``fields`` added (or replaced)."""
    return {**_img("/good.png"), **fields}


def gen(**options: Any) -> dict[str, Any]:
    return good(generation=options)


INV, FORBIDDEN, I0 = "invalid_input", "forbidden_url", "input.images[0]"
OVER_CAP = data_uri(os.urandom(300 * 1024))

CASES = [
    # files that are not what they claim
    Case("truncated-jpeg", INV, _img("/truncated.jpg"), names=I0),
    Case("corrupt-png", INV, _img("/corrupt.png"), names=I0),
    Case("zero-bytes", INV, _img("/zero.png"), names=I0),
    Case("zero-bytes-data-uri", INV, {"image": "data:image/png;base64,"}, names=I0),
    Case("decompression-bomb", INV, _img("/bomb.png"), names=I0),
    Case("over-pixel-cap", INV, _img("/big.png"), names=I0),
    Case("eps-as-png", INV, _img("/eps.png"), names=I0),
    Case("pdf-as-png", INV, _img("/pdf.png"), names=I0),
    Case("svg-as-png", INV, _img("/svg.png"), names=I0),
    Case("svg-data-uri", INV, {"image": data_uri(SVG, "image/svg+xml")}, names=I0),
    Case("gif-3000-frames", "succeeded", _img("/frames.gif")),
    Case("data-uri-over-cap", INV, {"image": OVER_CAP}, names=I0),
    Case("data-uri-not-base64", INV, {"image": "data:image/png;base64,@@@@"}, names=I0),
    Case("data-uri-not-image", INV, {"image": "data:text/html,<b>"}, I0),
    Case("never-finishes", "input_fetch_failed", _img("/endless.png"), names="deadline"),
    # wrong types, unknown fields, out-of-range values, empty lists
    Case("document-not-object", INV, "a string", "input", names="document"),
    Case("image-a-number", INV, {"image": 42}, I0),
    Case("images-a-string", INV, {"images": IMG + "/good.png"}, "input.images"),
    Case("attention-a-list", INV, good(attention=[1]), "input.attention"),
    Case("generation-a-string", INV, good(generation="fast"), "input.generation"),
    Case("priority-a-string", INV, good(), "priority", doc={"priority": "high"}),
    Case("unknown-input-field", INV, good(colour="red"), "input.colour"),
    Case("unknown-generation-field", INV, gen(beam_width=3), "input.generation.beam_width"),
    Case("unknown-document-field", INV, good(), "callback", doc={"callback": 1}, via_client=False),
    Case("id-path-traversal", INV, good(), "id", doc={"id": "../../x"}, via_client=False),
    Case("kind-unknown", INV, good(), "kind", kind="transmogrify"),
    Case("num-beams-99", INV, gen(num_beams=99), "input.generation.num_beams"),
    Case("max-new-tokens-0", INV, gen(max_new_tokens=0), "input.generation.max_new_tokens"),
    Case("temperature-nan", INV, gen(temperature=float("nan")), "input.generation.temperature"),
    Case("return-sequences-over-beams", INV, gen(num_return_sequences=4), "input.generation"),
    Case("priority-42", INV, good(), "priority", doc={"priority": 42}),
    Case("timeout-negative", INV, good(), "timeout_s", doc={"timeout_s": -1}),
    Case("metadata-too-big", INV, good(), "metadata", doc={"metadata": {"x": "x" * 5000}}),
    Case("prompt-too-long", INV, good(prompt="a" * 600), "input.prompt"),
    Case("images-empty", INV, {"images": []}, "input.images"),
    Case("too-many-images", INV, {"images": [IMG + "/good.png"] * 513}, "input.images"),
    Case("url-too-long", INV, {"image": IMG + "/" + "a" * 5000}, I0),
    Case("texts-empty", INV, good(texts=[]), "input.texts", kind="match"),
    Case("texts-blank", INV, good(texts=["   "]), "input.texts", kind="match"),
    # addresses the guard refuses before it connects
    Case("loopback-v4", FORBIDDEN, {"image": "http://127.0.0.1:{port}/good.png"}),
    Case("loopback-v6", FORBIDDEN, {"image": "http://[::1]:{port}/good.png"}),
    Case("v4-mapped-v6", FORBIDDEN, {"image": "http://[::ffff:127.0.0.1]:{port}/good.png"}),
    Case("decimal-loopback", FORBIDDEN, {"image": "http://2130706433:{port}/good.png"}),
    Case("name-localhost", FORBIDDEN, {"image": "http://localhost:{port}/good.png"}),
    Case("private-10", FORBIDDEN, {"image": "http://10.1.2.3/good.png"}, names="10.1.2.3"),
    Case("private-172-16", FORBIDDEN, {"image": "http://172.20.0.5/a.png"}, names="172.20.0.5"),
    Case("private-192-168", FORBIDDEN, {"image": "http://192.168.1.1/a.png"}, names="192.168"),
    Case("metadata", FORBIDDEN, {"image": "http://169.254.169.254/latest/meta-data/"}),
    Case("redirect-to-metadata", FORBIDDEN, _img("/to-metadata"), names="169.254.169.254"),
    Case("redirect-to-localhost", FORBIDDEN, _img("/to-localhost"), names="localhost"),
    Case("redirect-to-private", FORBIDDEN, _img("/to-private"), names=PRIVATE_IP),
    Case("name-with-a-private-address", FORBIDDEN, {"image": MIXED}, names=PRIVATE_IP),
    Case("file-url", FORBIDDEN, {"image": "file:///etc/passwd"}, names="file://"),
    Case("gopher-url", INV, {"image": "gopher://images.example/1"}, I0),
    Case("ftp-url", INV, {"image": "ftp://images.example/a.png"}, I0),
]


def _fill(value: Any, port: int) -> Any:
    if isinstance(value, str):
        return value.replace("{port}", str(port))
    if isinstance(value, list):
        return [_fill(v, port) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, port) for k, v in value.items()}
    return value


def _final(stack: Stack, job_id: str, timeout_s: float = 60) -> Any:
    wait_until(lambda: stack.store.get(job_id) is not None, timeout_s, f"record of {job_id}")
    return stack.client.wait(job_id, timeout_s)


def _check_worker_unchanged(corpus: Corpus, name: str = WORKER) -> None:
    """Same process, same registry entry (no restart, no model reload), a good job runs."""
    worker = corpus.workers[name]
    assert worker.alive()
    entry = corpus.registry_entry(name)
    for key in ("pid", "started_at", "model_load_s"):
        assert entry[key] == corpus.registry[name][key], key
    assert entry["pid"] == worker.pid
    client = corpus.stack.client
    if name == WORKER:
        good = client.caption(image=png_uri((30, 90, 200)), generation={"max_new_tokens": 4})
    else:
        good = client.generate("a boat", width=64, height=64, steps=2, seed=1)
    assert client.wait(good.id, 60).status == "succeeded"


def test_the_corpus_is_big_enough() -> None:
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)


def _first_hop(case: Case, inp: Any) -> str | None:
    """The image-host path a worker fetches for this case, if it gets that far."""
    if case.refused is not None or not isinstance(inp, dict):
        return None
    refs = [inp.get(k) for k in ("image", "mask", "style_image")] + inp.get("images", [])
    prefix = IMG.replace("{port}", "")
    for ref in refs:
        if isinstance(ref, str) and ref.startswith(prefix):
            return "/" + ref[len(prefix) :].split("/", 1)[1]
    return None


def _run_case(case: Case, corpus: Corpus, host: ImageHost, worker: str) -> None:
    stack = corpus.stack
    inp = _fill(case.input, host.port)
    hits_before = dict(host.hits)
    jobs: list[str] = []

    # 1. through the Client
    options = {k: v for k, v in case.doc.items() if k in ("priority", "timeout_s", "metadata")}
    if case.via_client:
        if case.refused is not None:
            with pytest.raises(InvalidInput) as refused:
                stack.client.submit(case.kind, inp, **options)
            assert case.refused in refused.value.message, refused.value.message
        else:
            jobs.append(stack.client.submit(case.kind, inp, **options).id)

    # 2. as a raw Celery message by task name (kind may be a lie: the worker checks)
    raw_id = f"raw-{uuid.uuid4().hex[:16]}"
    document: Any = (
        {"id": raw_id, "kind": case.kind, "input": inp, **case.doc}
        if isinstance(inp, dict)
        else inp
    )
    if worker == WORKER:
        task = task_name(case.kind if case.kind in ("caption", "match") else "caption")
        queue = "caption"
    else:
        task, queue = task_name(case.kind), case.kind
    corpus.celery.send_task(
        task, args=[document], task_id=raw_id, queue=stack.settings.queue_prefix + queue
    )
    jobs.append(raw_id)

    for job_id in jobs:
        record = _final(stack, job_id)
        if case.code == "succeeded":
            assert record.status == "succeeded", record.error
            continue
        assert record.status == "failed", record
        assert record.error is not None and record.error.code == case.code, record.error
        named = case.names or case.refused
        if named:
            assert named in record.error.message, record.error.message
        assert stack.storage_path("jobs", job_id, "result.json").is_file()

    # Only the first hop on the (simulated public) image host was ever requested, once
    # per job: refused addresses, redirect targets and the private half of a name never.
    hop = _first_hop(case, inp)
    fetched = {p: n - hits_before.get(p, 0) for p, n in host.hits.items()}
    assert {p: n for p, n in fetched.items() if n} == ({hop: len(jobs)} if hop else {})
    assert corpus.refused_connections() == [], "a connection to a non-loopback address"
    _check_worker_unchanged(corpus, worker)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, corpus: Corpus, host: ImageHost) -> None:
    _run_case(case, corpus, host, WORKER)


SQUARE = png_uri((120, 60, 30), (64, 64))
MASK_WIDE = data_uri(_encode(Image.new("L", (64, 32), 255), "PNG"))


def paint(**fields: Any) -> dict[str, Any]:
    """A valid inpaint input (before ``_diffusion_input``'s defaults) with ``fields``."""
    return {"image": SQUARE, "mask": SQUARE, **fields}


METADATA_PNG = "http://169.254.169.254/m.png"
ADAPTERS = {"adapters": [{"name": "no-such-lora"}]}
DIFFUSION_CASES = [
    Case("mask-of-the-wrong-size", INV, paint(mask=MASK_WIDE), names="mask", kind="inpaint"),
    Case("mask-corrupt", INV, paint(mask=IMG + "/corrupt.png"), names="input.mask", kind="inpaint"),
    Case(
        "mask-from-metadata",
        FORBIDDEN,
        paint(mask=METADATA_PNG),
        names="input.mask",
        kind="inpaint",
    ),
    Case(
        "inpaint-no-step-left", INV, paint(steps=2, strength=0.2), names="strength", kind="inpaint"
    ),
    Case("width-not-multiple-of-8", INV, {"width": 65}, "input.width", kind="generate"),
    Case("steps-0", INV, {"steps": 0}, "input.steps", kind="generate"),
    Case("seed-negative", INV, {"seed": -1}, "input.seed", kind="generate"),
    Case(
        "over-output-pixel-cap",
        INV,
        {"width": 2048, "height": 2048},
        names="2048x2048",
        kind="generate",
    ),
    Case("unknown-adapter", INV, ADAPTERS, names="no-such-lora", kind="generate"),
    Case(
        "style-without-ip-adapter",
        INV,
        {"image": SQUARE, "style_image": SQUARE},
        names="style_image",
        kind="style",
    ),
]


def _diffusion_input(case: Case) -> Case:
    defaults: dict[str, Any] = {"prompt": "a boat", "steps": 2, "seed": 1}
    if case.kind == "generate":
        defaults.update(width=64, height=64)
    return Case(**{**case.__dict__, "input": {**defaults, **case.input}})


@pytest.mark.parametrize(
    "case", [_diffusion_input(c) for c in DIFFUSION_CASES], ids=[c.id for c in DIFFUSION_CASES]
)
def test_bad_diffusion_input(case: Case, corpus: Corpus, host: ImageHost) -> None:
    _run_case(case, corpus, host, DIFFUSION_WORKER)


class _Marker:
    """Unpickling this calls ``open(path, "w")``: the file appears if a pickle ever runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def test_pickled_messages_are_refused_and_never_run(corpus: Corpus, tmp_path: Path) -> None:
    stack = corpus.stack
    queue = stack.settings.queue_prefix + "caption"
    marker = tmp_path / "pickle-ran"
    payload = pickle.dumps(([_Marker(marker)], {}, {}), protocol=4)
    # The payload is live: unpickled here (with a control path) it makes its file.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Marker(control))).close()
    assert control.exists()

    task_id = f"pickle-{uuid.uuid4().hex[:12]}"
    headers = {
        "lang": "py",
        "task": task_name("caption"),
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "argsrepr": "()",
        "kwargsrepr": "{}",
        "origin": "attacker",
        "retries": 0,
        "eta": None,
        "expires": None,
        "timelimit": [None, None],
    }
    with Connection(stack.settings.broker_url) as conn:
        producer = Producer(conn.default_channel)
        # Protocol 2 (task in the headers) and protocol 1 (everything in the pickle).
        producer.publish(
            payload,
            routing_key=queue,
            exchange="",
            headers=headers,
            content_type="application/x-python-serialize",
            content_encoding="binary",
            serializer=None,
        )
        legacy = pickle.dumps(
            {"task": task_name("caption"), "id": task_id + "-v1", "args": [_Marker(marker)]}
        )
        producer.publish(
            legacy,
            routing_key=queue,
            exchange="",
            content_type="application/x-python-serialize",
            content_encoding="binary",
            serializer=None,
        )
    # Both leave the queue (refused and acknowledged, not stuck or redelivered) ...
    wait_until(lambda: stack.redis.llen(queue) == 0, 30, "the queue to drain")
    _check_worker_unchanged(corpus)
    # ... without running, without a record, and without a crash.
    assert not marker.exists()
    assert stack.store.get(task_id) is None
    assert task_id not in json.dumps(stack.redis.hvals("unacked"))
    log = corpus.workers[WORKER].log_path.read_text(errors="replace")
    assert log.count("untrusted content") >= 2, log[-3000:]


def test_a_task_id_that_is_a_path_never_names_a_record_or_a_file(corpus: Corpus) -> None:
    stack = corpus.stack
    task_id = "../../../tmp/evil"
    corpus.celery.send_task(
        task_name("caption"),
        args=["not a job"],
        task_id=task_id,
        queue=stack.settings.queue_prefix + "caption",
    )
    # The record takes an id derived from the task id instead.
    derived = str(uuid.uuid5(uuid.NAMESPACE_URL, task_id))
    record = _final(stack, derived)
    assert record.status == "failed"
    assert record.error is not None and record.error.code == "invalid_input"
    assert stack.store.get(task_id) is None
    assert stack.storage_path("jobs", derived, "result.json").is_file()
    _check_worker_unchanged(corpus)
