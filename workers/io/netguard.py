"""The URL guard: outbound HTTP(S) only to addresses that are not private.

Used for image downloads, datasets and webhooks alike. Every address a name resolves to
is checked, the connection goes only to an address just checked (no DNS rebinding
between check and connect), redirects are re-checked by the callers, and a ``Deadline``
bounds the whole exchange so a server that trickles bytes cannot hold a worker.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
from contextlib import suppress
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import create_connection

from imageq.api_client.errors import ForbiddenUrl, InputFetchFailed
from imageq.api_client.redact import redact_ref
from imageq.api_client.settings import Settings

_NUMERIC_V4 = re.compile(r"[0-9a-fA-FxX.]+")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Module-level so tests can substitute a resolver; production always uses the system's.
_getaddrinfo = socket.getaddrinfo


# --- the URL guard ---------------------------------------------------------------


def _embedded_v4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address smuggles (mapped, 6to4, Teredo, NAT64)."""
    found = [a for a in (address.ipv4_mapped, address.sixtofour) if a is not None]
    if address.teredo is not None:
        found.extend(address.teredo)
    if address in _NAT64:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def _refusal(address: IPAddress) -> str | None:
    """Why ``address`` may not be fetched from, or None when it is a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        for inner in _embedded_v4(address):
            reason = _refusal(inner)
            if reason:
                return reason
    for reason, hit in (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("unspecified", address.is_unspecified),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        # Catches what the named classes miss, e.g. carrier-grade NAT 100.64/10, where
        # some clouds keep their metadata service.
        ("not globally routable", not address.is_global),
    ):
        if hit:
            return reason
    return None


def _literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    # inet_aton also reads the legacy forms resolvers accept (2130706433, 0x7f.1, 017700000001).
    if _NUMERIC_V4.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _vetted_addresses(host: str, port: int | None) -> list[str]:
    """Every address ``host`` resolves to, or ForbiddenUrl if any of them is not public.

    All of them are checked, not just the first: the connection may use any.
    """
    literal = _literal_address(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = _getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise InputFetchFailed(f"could not resolve host {host!r}: {exc}") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        if not addresses:
            raise InputFetchFailed(f"host {host!r} resolves to no address")
    for address in addresses:
        reason = _refusal(address)
        if reason:
            raise ForbiddenUrl(f"host {host!r} resolves to {address}, a {reason} address")
    return [str(a) for a in dict.fromkeys(addresses)]


def check_url(url: str, settings: Settings) -> None:
    """Raise ForbiddenUrl unless ``url`` is http(s) to public addresses (or private allowed).

    A name that does not resolve raises InputFetchFailed.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ForbiddenUrl(f"malformed URL {redact_ref(url)!r}: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ForbiddenUrl(f"URL scheme {parts.scheme!r} is not allowed; use http or https")
    host = parts.hostname
    if not host:
        raise ForbiddenUrl(f"URL {redact_ref(url)!r} has no host")
    if settings.allow_private_urls:
        return
    _vetted_addresses(host, port)


# --- connections that enforce the guard and a total deadline ----------------------

_current = threading.local()


class Deadline:
    """A total time limit on network I/O in this thread.

    Per-read socket timeouts never fire on a server that sends a byte every few seconds,
    so at expiry a timer shuts down every socket opened under this deadline, which wakes
    any read blocked on it.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._previous: Deadline | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(seconds, 0.0), self._expire)
        self._timer.daemon = True

    def remaining(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0 or self.expired:
            raise InputFetchFailed(f"deadline of {self.seconds:g} s exceeded")
        return left

    def adopt(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)

    def __enter__(self) -> Deadline:
        self._previous = getattr(_current, "deadline", None)
        _current.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        _current.deadline = self._previous


def _shut(sock: socket.socket) -> None:
    with suppress(OSError):  # already closed: nothing left to wake
        sock.shutdown(socket.SHUT_RDWR)


def _open_socket(conn: HTTPConnection, refuse_private: bool) -> socket.socket:
    # Resolving again here and connecting only to the addresses just vetted closes the
    # DNS-rebinding gap between check_url and the connection.
    hosts = _vetted_addresses(conn.host, conn.port) if refuse_private else [conn.host]
    last: OSError | None = None
    for host in hosts:
        try:
            sock = create_connection(
                (host, conn.port),
                conn.timeout,
                source_address=conn.source_address,
                socket_options=conn.socket_options,
            )
        except socket.gaierror as exc:
            raise NameResolutionError(conn.host, conn, exc) from exc
        except TimeoutError as exc:
            raise ConnectTimeoutError(conn, f"connection to {conn.host} timed out") from exc
        except OSError as exc:
            last = exc
            continue
        deadline: Deadline | None = getattr(_current, "deadline", None)
        if deadline is not None:
            deadline.adopt(sock)
        return sock
    raise NewConnectionError(conn, f"Failed to establish a new connection: {last}")


def _pool_classes(refuse_private: bool) -> dict[str, type[HTTPConnectionPool]]:
    class Connection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return _open_socket(self, refuse_private)

    class TLSConnection(HTTPSConnection):
        # TLS still verifies against the host name: only the socket underneath is pinned.
        def _new_conn(self) -> socket.socket:
            return _open_socket(self, refuse_private)

    class Pool(HTTPConnectionPool):
        ConnectionCls = Connection

    class TLSPool(HTTPSConnectionPool):
        ConnectionCls = TLSConnection

    return {"http": Pool, "https": TLSPool}


_POOLS = {flag: _pool_classes(flag) for flag in (True, False)}


class _SafeAdapter(HTTPAdapter):
    def __init__(self, refuse_private: bool) -> None:
        self._refuse_private = refuse_private  # read by init_poolmanager during __init__
        super().__init__(max_retries=0)

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: object
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS[self._refuse_private]


def safe_session(settings: Settings) -> requests.Session:
    """A Session whose connections re-check every address they connect to.

    Environment proxies are ignored: a proxy would connect on our behalf and bypass the
    address check.
    """
    session = requests.Session()
    session.trust_env = False
    adapter = _SafeAdapter(refuse_private=not settings.allow_private_urls)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
