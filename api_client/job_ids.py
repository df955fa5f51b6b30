"""Job ids made from idempotency keys, keyed by a deployment secret for tenant jobs.

A gateway tenant's job id is HMAC-SHA256(secret, tenant, key), shaped as a uuid: a
tenant that knows another's name and keys still cannot compute its job ids (nor the
storage keys named after them). The secret is ``IMAGEQ_ID_SECRET``; a deployment that
sets none gets one generated once and kept in Redis beside the records (``SET NX``), so
every producer of the deployment (Client, gateway, CLI) derives the same ids with no
setup, and anyone able to read it could read the records anyway. Setting
``IMAGEQ_ID_SECRET`` later changes the ids of keys used after the change (a key replayed
across it makes a second job).

Jobs without a tenant (producers that hold the Redis password) keep their public
uuid5 ids: those producers can read every record already.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import uuid

import redis

IDEMPOTENCY_NAMESPACE = uuid.UUID("6f1f5bd2-4b8e-4d64-8f0f-2a3c86d5a4e1")
#: Bytes of a generated secret (256 bits, HMAC-SHA256's block of security).
SECRET_BYTES = 32


def keyed_uuid(secret: bytes, tenant: str, key: str) -> str:
    """The uuid-shaped HMAC of (tenant, key): version 8 (RFC 9562, custom), variant 1."""
    # Lengths first: ("ab", "c") and ("a", "bc") must not collide.
    message = f"{len(tenant)}:{tenant}:{key}".encode()
    raw = bytearray(hmac.new(secret, message, hashlib.sha256).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80
    raw[8] = (raw[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(raw)))


def job_id_for(idempotency_key: str | None, tenant: str | None = None, secret: bytes = b"") -> str:
    """Ids derive from the idempotency key, so two submits of one key share one id.

    A tenant's id is keyed by ``secret`` (required then): two tenants that both use
    "order-1" get two jobs, and neither can compute the other's id.
    """
    if not idempotency_key:
        return str(uuid.uuid4())
    if tenant is None:
        return str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, idempotency_key))
    if not secret:
        raise ValueError("a tenant's job id needs the deployment's id secret")
    return keyed_uuid(secret, tenant, idempotency_key)


class IdSecret:
    """The deployment's id secret: the setting, else the one kept in Redis (made once).

    Read from Redis once per process: it never changes while the records exist.
    """

    def __init__(self, configured: str, client: redis.Redis, key: str) -> None:
        self._value = configured.encode()
        self._redis = client
        self._key = key
        self._lock = threading.Lock()

    def get(self) -> bytes:
        if self._value:
            return self._value
        with self._lock:
            if not self._value:
                fresh = secrets.token_hex(SECRET_BYTES)
                # NX: the first producer's secret wins; every other reads it back.
                self._redis.set(self._key, fresh, nx=True)
                stored = self._redis.get(self._key)
                self._value = str(stored if stored is not None else fresh).encode()
        return self._value
