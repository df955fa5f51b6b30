"""Adapter namespaces: which registry entries a tenant sees, and where they live.

One Redis hash (``RecordStore.keys.adapters()``) holds every published adapter. A shared
adapter (published by a job without a tenant: the operator's) is the field ``{name}``,
as before tenants had adapters; a tenant's is ``{tenant}/{name}``. Neither a tenant
(``TENANT_PATTERN``) nor an adapter name may hold "/", so a field names one owner and
one adapter. A tenant sees, uses and deletes its own adapters and the shared ones; a
name resolves to its own first, then the shared one. Storage keeps the same split
(``adapter_folder``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from imageq.api_client.errors import InvalidInput

#: Tenant adapters' storage folder; "_" cannot start an adapter name, so no shared
#: adapter's folder can collide with it.
TENANTS_FOLDER = "_tenants"


def adapter_field(name: str, tenant: str | None) -> str:
    """The registry field of ``name`` in ``tenant``'s namespace (None: the shared one).

    A name holding "/" is refused here too, not only by the input models: as
    ``{other}/{secret}`` it would be another tenant's field."""
    if "/" in name:
        raise InvalidInput(f"adapter: {name!r} is not an adapter name")
    return name if tenant is None else f"{tenant}/{name}"


def lookup_fields(name: str, tenant: str | None) -> list[str]:
    """The fields a job of ``tenant`` may mean by ``name``, in resolution order."""
    return [name] if tenant is None else [adapter_field(name, tenant), name]


def adapter_folder(name: str, tenant: str | None) -> str:
    """The storage folder (no trailing slash) that holds the adapter's versions."""
    if tenant is None:
        return f"adapters/{name}"
    return f"adapters/{TENANTS_FOLDER}/{tenant}/{name}"


def entry_tenant(entry: dict[str, Any]) -> str | None:
    """The owner an entry records (entries from before tenants had adapters: shared)."""
    tenant = entry.get("tenant")
    return None if tenant is None else str(tenant)


def visible(entries: Iterable[dict[str, Any]], tenant: str | None) -> list[dict[str, Any]]:
    """What ``tenant`` may see: its own entries and the shared ones (None: all of them,
    the operator's view)."""
    if tenant is None:
        return list(entries)
    return [e for e in entries if entry_tenant(e) in (None, tenant)]
