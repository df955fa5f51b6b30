"""Reading a file's C2PA manifest back and judging it: ``imageq verify FILE``."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import c2pa


class Verdict(Enum):
    """What a verifier may conclude of a file."""

    #: The signature and every hash hold, and the signer chains to a trusted CA.
    TRUSTED = "trusted"
    #: The signature and every hash hold; the signer is on no trust list given (a
    #: development chain, or a production one the verifier was not told of).
    VALID = "valid"
    #: The manifest fails: a changed pixel, a broken signature, a malformed claim.
    INVALID = "invalid"
    #: The file has no C2PA manifest.
    NO_MANIFEST = "no_manifest"

    @property
    def validates(self) -> bool:
        """The signature and the content hashes hold (trust aside)."""
        return self in (Verdict.TRUSTED, Verdict.VALID)


@dataclass(frozen=True)
class Verification:
    verdict: Verdict
    #: The manifest store as c2pa's Reader reports it (with its validation results).
    store: dict[str, Any] = field(default_factory=dict)
    #: The codes of failed checks, untrust included ("signingCredential.untrusted").
    failures: list[str] = field(default_factory=list)

    def active_manifest(self) -> dict[str, Any]:
        label = self.store.get("active_manifest")
        manifests: dict[str, Any] = self.store.get("manifests", {})
        return dict(manifests.get(label, {})) if label else {}

    def actions(self) -> list[dict[str, Any]]:
        """The active manifest's actions, in order."""
        for assertion in self.active_manifest().get("assertions", []):
            if str(assertion.get("label", "")).startswith("c2pa.actions"):
                return list(assertion["data"]["actions"])
        return []


UNTRUSTED = "signingCredential.untrusted"


def verify(
    data: bytes, mime: str = "image/png", trust_anchors: bytes | None = None
) -> Verification:
    """``data``'s manifest and verdict; ``trust_anchors`` (PEM CAs) is the trust list."""
    config: dict[str, Any] = {"builder": {"thumbnail": {"enabled": False}}}
    if trust_anchors is not None:
        config["trust"] = {"trust_anchors": trust_anchors.decode()}
    context = c2pa.Context.from_dict(config)
    try:
        with c2pa.Reader(mime, io.BytesIO(data), None, context) as reader:
            store: dict[str, Any] = json.loads(reader.json())
            state = reader.get_validation_state()
    except c2pa.C2paError as exc:
        if "ManifestNotFound" in type(exc).__name__ or "no JUMBF" in str(exc):
            return Verification(Verdict.NO_MANIFEST)
        return Verification(Verdict.INVALID, failures=[str(exc)])
    results = store.get("validation_results", {}).get("activeManifest", {})
    failures = [str(f.get("code")) for f in results.get("failure", [])]
    if state == "Trusted":
        verdict = Verdict.TRUSTED
    elif state == "Valid" and set(failures) <= {UNTRUSTED}:
        verdict = Verdict.VALID
    else:
        verdict = Verdict.INVALID
    return Verification(verdict, store, failures)
