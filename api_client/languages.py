"""Language tags (BCP 47, RFC 5646): validation, canonical case, and matching (RFC 4647).

Caption adapters carry the language they write; a caption job may ask for a language
instead of naming an adapter. Tags are checked for well-formedness (the registry of
subtags is not consulted: a deployment may train for any language, including private
use ones such as ``x-klingon``) and stored in RFC 5646's canonical case, so ``FR-ca``
and ``fr-CA`` name one language.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# RFC 5646 §2.1 ("langtag" and "privateuse"; grandfathered tags are refused: each has a
# modern equivalent, e.g. "zh-min-nan" is "nan").
_LANGTAG = re.compile(
    r"""^(?:
      (?P<language>[a-z]{2,3}(?:-[a-z]{3}){0,3}|[a-z]{4}|[a-z]{5,8})
      (?:-(?P<script>[a-z]{4}))?
      (?:-(?P<region>[a-z]{2}|[0-9]{3}))?
      (?P<variants>(?:-(?:[a-z0-9]{5,8}|[0-9][a-z0-9]{3}))*)
      (?P<extensions>(?:-[a-wyz0-9](?:-[a-z0-9]{2,8})+)*)
      (?:-x(?:-[a-z0-9]{1,8})+)?
    |x(?:-[a-z0-9]{1,8})+)$""",
    re.VERBOSE,
)
#: The language of the base captioning model (BLIP's English WordPiece vocabulary).
BASE_LANGUAGE = "en"


def language_tag(value: str) -> str:
    """``value`` in canonical case; ``ValueError`` if it is not a well-formed BCP 47 tag."""
    if not isinstance(value, str):
        raise ValueError("a language must be a BCP 47 tag such as 'fr' or 'ja-JP'")
    tag = value.strip().replace("_", "-").lower()
    match = _LANGTAG.match(tag)
    if match is None or len(tag) > 64:
        raise ValueError(
            f"{value!r} is not a BCP 47 language tag (e.g. 'fr', 'ja', 'pt-BR', 'zh-Hant')"
        )
    variants = [v for v in (match.group("variants") or "").split("-") if v]
    singletons = re.findall(r"-([a-wyz0-9])(?=-)", match.group("extensions") or "")
    if len(set(variants)) != len(variants) or len(set(singletons)) != len(singletons):
        raise ValueError(f"{value!r} repeats a variant or an extension")
    return _canonical_case(tag)


def _canonical_case(tag: str) -> str:
    """RFC 5646 §2.1.1: script in title case and region in upper case, after the first
    subtag and before any singleton; everything else lower case."""
    parts = tag.split("-")
    out = [parts[0]]
    after_singleton = len(parts[0]) == 1
    for part in parts[1:]:
        if len(part) == 1:
            after_singleton = True
        if not after_singleton and len(part) == 4 and part.isalpha():
            part = part.title()
        elif not after_singleton and len(part) == 2 and part.isalpha():
            part = part.upper()
        out.append(part)
    return "-".join(out)


def primary(tag: str) -> str:
    """The primary language subtag: ``fr`` for ``fr-CA``."""
    return tag.split("-", 1)[0].lower()


def match_rank(requested: str, offered: str) -> int | None:
    """How well an adapter tagged ``offered`` serves a request for ``requested``.

    0: the same tag; 1: ``offered`` is a prefix of the request (RFC 4647 lookup: a
    request for ``fr-CA`` falls back to ``fr``); 2: ``offered`` is more specific than the
    request (RFC 4647 basic filtering: ``fr`` accepts ``fr-CA``). None: no match.
    """
    req, off = requested.lower(), offered.lower()
    if req == off:
        return 0
    if req.startswith(off + "-"):
        return 1
    if off.startswith(req + "-"):
        return 2
    return None


def best_matches(requested: str, offered: Iterable[str]) -> list[str]:
    """The offered tags of the best rank for ``requested`` (empty: none matches)."""
    ranked = [(rank, tag) for tag in offered if (rank := match_rank(requested, tag)) is not None]
    if not ranked:
        return []
    best = min(rank for rank, _ in ranked)
    return [tag for rank, tag in ranked if rank == best]
