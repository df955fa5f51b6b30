"""Shorten what must not be shown in Flower, logs or task arguments."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit


def redact_ref(ref: str) -> str:
    """A reference safe and short enough for logs and Flower: no payloads, queries or passwords."""
    if ref[:5].lower() == "data:":
        header, comma, payload = ref.partition(",")
        if not comma:
            return "data:…(malformed)"
        compact = "".join(payload.split())
        size = len(compact) * 3 // 4 - compact[-2:].count("=")
        return f"{header[:64]},…({max(size, 0)} bytes)"
    try:
        parts = urlsplit(ref)
    except ValueError:
        return ref[:120] + ("…" if len(ref) > 120 else "")
    if not parts.scheme:
        return ref[:120] + ("…" if len(ref) > 120 else "")
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


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
