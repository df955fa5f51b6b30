"""Shorten what must not be shown in Flower, logs or task arguments."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit


def redact_ref(ref: str) -> str:
    """Inline images become a size note; URLs lose their query (it may hold a token)."""
    if ref.startswith("data:"):
        head = ref.split(",", 1)[0]
        return f"{head},...({len(ref)} chars)"
    if ref.startswith(("http://", "https://")):
        parts = urlsplit(ref)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return ref


def redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_ref(value)
    if isinstance(value, list):
        return [redact_value(v) for v in value]
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    return value


def redact_document(document: dict[str, Any]) -> dict[str, Any]:
    out = dict(document)
    out["input"] = redact_value(document.get("input", {}))
    if isinstance(document.get("webhook"), dict):
        out["webhook"] = {**document["webhook"], "url": redact_ref(document["webhook"]["url"])}
    return out
