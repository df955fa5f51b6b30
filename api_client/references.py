"""What a tenant's job may name (DESIGN §2 "Image references", §11).

Every input field whose value a worker fetches is marked with ``REFERENCE`` in its type
(``imageq.api_client.inputs``); ``references`` walks any input model and yields each marked
value with its field path (``input.images[3]``), so a new field is checked as soon as it
is marked, and a test holds every fetched field to being marked. ``check_references``
is the one rule, used by the gateway (early, a 422) and by the worker before any fetch
(the line that holds: a job enqueued any other way is checked too).

A tenant's job may name its own uploads (``storage://uploads/TENANT/...``), http(s)
URLs (the workers' SSRF guard applies when fetched), ``data:`` URIs, and ``s3://`` or
``file://`` references under a prefix the operator granted the tenant
(``imageq tokens create TENANT --allow-prefix s3://bucket/path/``). Anything else is
``forbidden_url`` with one message per field, whatever the object behind it: the answer
never tells whether a key, a bucket or a file exists.
"""

from __future__ import annotations

import json
import threading
import time
import types
from collections.abc import Iterator, Sequence
from typing import Annotated, Any, Union, get_args, get_origin

import redis
from pydantic import BaseModel

from imageq.api_client.errors import ForbiddenUrl, InvalidInput, TransientError
from imageq.api_client.inputs import REFERENCE, Reference
from imageq.api_client.records import RecordStore
from imageq.api_client.uploads import STORAGE_SCHEME, UPLOAD_PREFIX

#: Schemes only a grant opens; the prefixes granted are lower-case in their scheme.
GRANTABLE_SCHEMES = ("s3://", "file://")
#: The field of a tenant's hash (``RecordStore.keys.gateway_tenant(NAME)``) holding its
#: granted prefixes, a JSON list.
GRANTS_FIELD = "allow_prefixes"


# -- the walker ---------------------------------------------------------------------


def _marked(metadata: Sequence[Any]) -> bool:
    return any(isinstance(item, Reference) for item in metadata)


def _walk(tp: Any, value: Any, path: str) -> Iterator[tuple[str, str]]:
    if value is None:
        return
    if isinstance(value, BaseModel):
        for name, info in type(value).model_fields.items():
            # pydantic lifts a field's own Annotated metadata into ``info.metadata``.
            annotation: Any = info.annotation
            if _marked(info.metadata):
                annotation = Annotated[annotation, REFERENCE]
            yield from _walk(annotation, getattr(value, name), f"{path}.{name}")
        return
    origin = get_origin(tp)
    if origin is Annotated:
        base, *metadata = get_args(tp)
        if _marked(metadata):
            if isinstance(value, str):
                yield path, value
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    yield from _walk(tp, item, f"{path}[{i}]")
            return
        yield from _walk(base, value, path)
    elif origin in (Union, types.UnionType):
        for arg in get_args(tp):
            if arg is not type(None):
                yield from _walk(arg, value, path)
    elif isinstance(value, list | tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        for i, item in enumerate(value):
            yield from _walk(item_tp, item, f"{path}[{i}]")


def references(model: BaseModel, path: str = "input") -> Iterator[tuple[str, str]]:
    """``(field path, value)`` of every reference an input model names."""
    yield from _walk(type(model), model, path)


def reference_fields(model: type[BaseModel], path: str = "") -> list[str]:
    """The marked fields of an input model class (``images[]``, ``vocabulary.tokenizer``)."""
    found: list[str] = []
    for name, info in model.model_fields.items():
        here = f"{path}{name}"
        if _marked(info.metadata):
            found.append(here + ("[]" if get_origin(info.annotation) is list else ""))
        else:
            found.extend(_type_fields(info.annotation, here))
    return found


def _type_fields(tp: Any, path: str) -> list[str]:
    origin = get_origin(tp)
    if origin is Annotated:
        base, *metadata = get_args(tp)
        return [path] if _marked(metadata) else _type_fields(base, path)
    if origin in (Union, types.UnionType):
        return [f for arg in get_args(tp) for f in _type_fields(arg, path)]
    if origin is list:
        return _type_fields(get_args(tp)[0], path + "[]")
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return reference_fields(tp, path + ".")
    return []


# -- the rule -----------------------------------------------------------------------


def _plain_path(rest: str) -> bool:
    """No segment that a reader could resolve elsewhere (``..``, ``.``, ``//``) and no
    escapes a reader would decode: a granted prefix then means what it says."""
    if any(c in rest for c in "%\\\x00?#"):
        return False
    parts = rest.split("/")[1:]  # the first is the bucket (s3) or the host (file: empty)
    return not any(p in (".", "..") for p in parts) and "" not in parts[:-1]


def _split_scheme(ref: str) -> tuple[str, str]:
    scheme, sep, rest = ref.partition("://")
    return (scheme.lower() + "://", rest) if sep else ("", ref)


def check_grant(prefix: str) -> str:
    """A prefix an operator may grant, normalised (its scheme in lower case)."""
    scheme, rest = _split_scheme(prefix.strip())
    if (
        scheme not in GRANTABLE_SCHEMES
        or not rest.endswith("/")
        or not _plain_path(rest)
        or (scheme == "s3://" and not rest.split("/")[0])
        or (scheme == "file://" and (not rest.startswith("/") or rest == "/"))
    ):
        raise InvalidInput(
            f"allow-prefix: {prefix!r} must be s3://BUCKET/PATH/ or file:///ABS/PATH/ "
            "(ending in '/', no '.', '..', empty segments or escapes)"
        )
    return scheme + rest


def allowed(ref: str, tenant: str, grants: Sequence[str]) -> bool:
    """Whether a job of ``tenant`` may name ``ref``; decided on the string alone."""
    if ref.startswith("data:"):
        return True
    scheme, rest = _split_scheme(ref)
    if scheme in ("https://", "http://"):
        return True
    if ref.startswith(STORAGE_SCHEME):
        own = f"{UPLOAD_PREFIX}{tenant}/"
        return rest.startswith(own) and len(rest) > len(own) and _plain_path("x/" + rest)
    if scheme in GRANTABLE_SCHEMES and _plain_path(rest):
        return any((scheme + rest).startswith(prefix) for prefix in grants)
    return False


def forbidden(field: str, tenant: str) -> ForbiddenUrl:
    """The one refusal: it names the field and the rule, never the object."""
    return ForbiddenUrl(
        f"{field}: a job of tenant {tenant!r} may name its own uploads "
        f"({STORAGE_SCHEME}{UPLOAD_PREFIX}{tenant}/...), http(s):// URLs, data: URIs, "
        "or s3:// and file:// references under a prefix the operator granted it"
    )


def check_references(model: BaseModel, tenant: str, grants: Sequence[str]) -> None:
    """Raise ``ForbiddenUrl`` for the first reference ``tenant`` may not name."""
    for field, ref in references(model):
        if not allowed(ref, tenant, grants):
            raise forbidden(field, tenant)


# -- the grants, in Redis -----------------------------------------------------------


def tenant_key(store: RecordStore, tenant: str) -> str:
    """The hash of a gateway tenant (limits, grants): ``imageq:{prefix}gw:tenant:NAME``."""
    return store.keys.gateway_tenant(tenant)


def parse_grants(raw: str | bytes | None) -> tuple[str, ...]:
    if not raw:
        return ()
    try:
        value = json.loads(raw)
    except ValueError:
        return ()  # unreadable: grants nothing
    return tuple(str(p) for p in value) if isinstance(value, list) else ()


class GrantReader:
    """A tenant's granted prefixes: one Redis read per tenant, remembered ``cache_s`` (a
    withdrawn grant stops opening references within that time)."""

    def __init__(self, store: RecordStore, cache_s: float) -> None:
        self.store = store
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._lock = threading.Lock()

    def grants(self, tenant: str) -> tuple[str, ...]:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(tenant)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            raw = self.store.redis.hget(tenant_key(self.store, tenant), GRANTS_FIELD)
        except redis.RedisError as exc:
            raise TransientError(f"reading tenant {tenant!r}'s grants: {exc}") from None
        found = parse_grants(raw)
        if self.cache_s > 0:
            with self._lock:
                if len(self._cache) >= 10_000:  # tenants are few; start over when full
                    self._cache.clear()
                self._cache[tenant] = (now + self.cache_s, found)
        return found

    def check(self, model: BaseModel, tenant: str | None) -> None:
        """``check_references`` for a tenant's job; nothing to check without a tenant."""
        if tenant is None:
            return
        check_references(model, tenant, self.grants(tenant))
