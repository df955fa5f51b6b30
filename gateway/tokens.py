"""Tenants and their tokens, in Redis beside the job records.

A token is shown once, when it is made; Redis keeps only its SHA-256, so a copy of the
database lets no one call the gateway. A token is found by its hash (what an attacker
can learn from the timing of that lookup is a hash prefix, which is worthless) and then
compared with ``hmac.compare_digest``. A tenant may hold several tokens (rotation:
make a new one, move the callers, revoke the old by its prefix).

Keys (``imageq:{prefix}gw:...``): ``token:{sha256}`` (JSON: tenant, prefix, created_at),
``tenant:{name}`` (hash: rate, max_in_flight, max_priority, allow_prefixes, created_at),
``tenant-tokens:{name}`` (set of hashes), ``tenants`` (set of names).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from imageq.api_client.errors import InvalidInput
from imageq.api_client.records import RecordStore, utcnow
from imageq.api_client.references import GRANTS_FIELD, check_grant, parse_grants, tenant_key
from imageq.api_client.schemas import TENANT_PATTERN

TOKEN_PREFIX = "iq_"
# What `tokens list` shows and `tokens revoke` accepts of a token: "iq_" and 8 more.
SHOWN_CHARS = 11
MAX_TOKEN_CHARS = 256
_TENANT = re.compile(TENANT_PATTERN)


@dataclass(frozen=True)
class Tenant:
    """Who a request is, as its token says; limits are read where they are enforced."""

    name: str
    token_prefix: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS:
        return None
    return token


def check_tenant_name(name: str) -> str:
    if not _TENANT.match(name) or name.startswith(TOKEN_PREFIX):
        raise InvalidInput(
            f"tenant: {name!r} must be 1-64 letters, digits, '.', '_' or '-', start with a "
            f"letter or digit, and not start with {TOKEN_PREFIX!r}"
        )
    return name


class TokenStore:
    """Create, list and revoke tokens (the ``imageq tokens`` command; synchronous)."""

    def __init__(self, client: redis.Redis, store: RecordStore) -> None:
        self.redis = client
        self.store = store
        self.keys = store.keys

    def create(
        self,
        tenant: str,
        rate: float | None = None,
        max_in_flight: int | None = None,
        max_priority: int | None = None,
        allow_prefixes: list[str] | None = None,
    ) -> str:
        """A new token for ``tenant`` (made if new); limits and granted prefixes given
        here replace its own (an empty list withdraws every grant)."""
        check_tenant_name(tenant)
        grants = None if allow_prefixes is None else [check_grant(p) for p in allow_prefixes]
        if rate is not None and rate < 0:
            raise InvalidInput("rate: must be 0 (no limit) or more jobs per second")
        if max_in_flight is not None and max_in_flight < 0:
            raise InvalidInput("max_in_flight: must be 0 (no limit) or more jobs")
        if max_priority is not None and not 0 <= max_priority <= 9:
            raise InvalidInput("max_priority: must be a job priority, 0 to 9")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        digest = hash_token(token)
        entry = {
            "tenant": tenant,
            "prefix": token[:SHOWN_CHARS],
            "sha256": digest,
            "created_at": utcnow(),
        }
        limits: dict[str, str] = {}
        if rate is not None:
            limits["rate"] = repr(float(rate))
        if max_in_flight is not None:
            limits["max_in_flight"] = str(int(max_in_flight))
        if max_priority is not None:
            limits["max_priority"] = str(int(max_priority))
        if grants is not None:
            limits[GRANTS_FIELD] = json.dumps(sorted(set(grants)))
        pipe = self.redis.pipeline(transaction=True)
        pipe.hsetnx(tenant_key(self.store, tenant), "created_at", entry["created_at"])
        for field, value in limits.items():
            pipe.hset(tenant_key(self.store, tenant), field, value)
        pipe.set(self.keys.gateway_token(digest), json.dumps(entry))
        pipe.sadd(self.keys.gateway_tenant_tokens(tenant), digest)
        pipe.sadd(self.keys.gateway_tenants(), tenant)
        pipe.execute()
        return token

    def tenants(self) -> list[dict[str, Any]]:
        """Every tenant with its limits (None: the deployment's default) and tokens."""
        out = []
        for name in sorted(str(t) for t in self.redis.smembers(self.keys.gateway_tenants())):
            config = self.redis.hgetall(tenant_key(self.store, name))
            digests = sorted(
                str(d) for d in self.redis.smembers(self.keys.gateway_tenant_tokens(name))
            )
            raws = self.redis.mget([self.keys.gateway_token(d) for d in digests]) if digests else []
            tokens = [json.loads(raw) for raw in raws if raw]
            out.append(
                {
                    "tenant": name,
                    "rate": float(config["rate"]) if "rate" in config else None,
                    "max_in_flight": (
                        int(config["max_in_flight"]) if "max_in_flight" in config else None
                    ),
                    "max_priority": (
                        int(config["max_priority"]) if "max_priority" in config else None
                    ),
                    "allow_prefixes": list(parse_grants(config.get(GRANTS_FIELD))),
                    "created_at": config.get("created_at"),
                    "tokens": [
                        {"prefix": t["prefix"], "created_at": t["created_at"]}
                        for t in sorted(tokens, key=lambda t: str(t["created_at"]))
                    ],
                }
            )
        return out

    def revoke(self, what: str) -> list[str]:
        """Revoke every token of tenant ``what``, or the one token ``what`` begins
        (a shown prefix, or the whole token). Returns the revoked tokens' prefixes.

        A prefix that matches tokens of two tenants is refused: revoking is not a guess.
        """
        if self.redis.sismember(self.keys.gateway_tenants(), what):
            digests = [str(d) for d in self.redis.smembers(self.keys.gateway_tenant_tokens(what))]
            return self._revoke(what, digests)
        if len(what) < 6:
            raise InvalidInput("give a tenant name, or at least 6 characters of a token")
        matches: list[tuple[str, str]] = []
        for tenant in self.redis.smembers(self.keys.gateway_tenants()):
            for digest in self.redis.smembers(self.keys.gateway_tenant_tokens(str(tenant))):
                raw = self.redis.get(self.keys.gateway_token(str(digest)))
                if raw is None:
                    continue
                shown = str(json.loads(raw)["prefix"])
                whole = what.startswith(TOKEN_PREFIX) and len(what) > SHOWN_CHARS
                if (whole and hmac.compare_digest(hash_token(what), str(digest))) or (
                    not whole and shown.startswith(what)
                ):
                    matches.append((str(tenant), str(digest)))
        if len({t for t, _ in matches}) > 1 or len(matches) > 1:
            raise InvalidInput(f"{what!r} matches {len(matches)} tokens; give more of it")
        if not matches:
            return []
        tenant, digest = matches[0]
        return self._revoke(tenant, [digest])

    def _revoke(self, tenant: str, digests: list[str]) -> list[str]:
        if not digests:
            return []
        raws = self.redis.mget([self.keys.gateway_token(d) for d in digests])
        pipe = self.redis.pipeline(transaction=True)
        for digest in digests:
            pipe.delete(self.keys.gateway_token(digest))
            pipe.srem(self.keys.gateway_tenant_tokens(tenant), digest)
        pipe.execute()
        return [str(json.loads(raw)["prefix"]) for raw in raws if raw]


class Authenticator:
    """Who a request's token belongs to: one Redis read on the gateway's event loop,
    remembered for ``cache_s`` (so a revoked token stops working within that time)."""

    # Entries kept at most; the cache starts over when full (tokens are few).
    MAX_CACHED = 10_000

    def __init__(self, client: aioredis.Redis, store: RecordStore, cache_s: float = 1.0) -> None:
        self.redis = client
        self.store = store
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, Tenant]] = {}

    async def tenant(self, authorization: str | None) -> Tenant | None:
        """The tenant of a valid, unrevoked token; None for anything else."""
        token = parse_bearer(authorization)
        if token is None:
            return None
        digest = hash_token(token)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        raw = await self.redis.get(self.store.keys.gateway_token(digest))
        if raw is None:
            self._cache.pop(digest, None)
            return None
        entry = json.loads(raw)
        # Found by its hash; the entry's own copy of the hash must match it, compared in
        # constant time (an entry filed under the wrong key grants nothing).
        if not hmac.compare_digest(str(entry.get("sha256", "")), digest):
            return None
        tenant = Tenant(name=str(entry["tenant"]), token_prefix=str(entry["prefix"]))
        if self.cache_s > 0:
            if len(self._cache) >= self.MAX_CACHED:
                self._cache.clear()
            self._cache[digest] = (now + self.cache_s, tenant)
        return tenant
