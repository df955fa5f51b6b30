"""Signed C2PA manifests on diffusion outputs (IMAGEQ_PROVENANCE_CERT / _KEY).

A job's thread signs its PNGs right after encoding them (never the pipeline's thread):
about 7 ms and 3.6 kB a 512x512 image on the 2-core test machine (bench/provenance.py,
docs/diffusion.md "Provenance"), beside about 60 ms to encode the PNG. c2pa's default
claim thumbnail is off: it would re-decode the PNG and add a JPEG of about 30 kB for about
90 ms an image (measured with it on), and the image is its own best thumbnail.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import c2pa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from imageq.api_client.settings import Settings, SettingsError
from imageq.workers.provenance.claims import Origin

log = logging.getLogger(__name__)

GENERATOR = "imageq"
#: Where an output's own facts go in its action's parameters (reverse-domain, as C2PA
#: asks of names it does not define).
MODEL_PARAM, ADAPTERS_PARAM, JOB_PARAM = "org.imageq.model", "org.imageq.adapters", "org.imageq.job"
INPUT_LABEL = "input"
UNSIGNED_WARNING = (
    "provenance: no signing certificate (IMAGEQ_PROVENANCE_CERT / IMAGEQ_PROVENANCE_KEY): "
    "outputs carry the IPTC digital source type in XMP but no signed C2PA manifest, which "
    "the EU AI Act (Art. 50) expects of generated images; `imageq provenance init` makes "
    "a development chain"
)


@cache
def imageq_version() -> str:
    try:
        return metadata.version("imageq")
    except metadata.PackageNotFoundError:  # a source checkout that was never installed
        return "0+unknown"


@dataclass(frozen=True)
class Ingredient:
    """The image an edited output was made from, as the manifest's ``parentOf``."""

    data: bytes
    #: Its MIME type; one c2pa cannot read is passed as a PNG re-encoding instead.
    mime: str
    title: str = "input.image"


@dataclass(frozen=True)
class Claim:
    """What one output's manifest states."""

    origin: Origin
    model: str
    adapters: list[str] = field(default_factory=list)
    #: The job's parameters; left out of the manifest with IMAGEQ_PROVENANCE_PARAMETERS=0.
    parameters: dict[str, Any] = field(default_factory=dict)
    #: Required for ``Origin.EDITED``: C2PA's first action must open an ingredient.
    ingredient: Ingredient | None = None
    title: str = "image.png"


def _algorithm(key_pem: bytes) -> c2pa.C2paSigningAlg:
    """ES256/384/512 for an EC key (by curve), PS256 for RSA, Ed25519 for Ed25519."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        by_curve = {256: c2pa.C2paSigningAlg.ES256, 384: c2pa.C2paSigningAlg.ES384}
        return by_curve.get(key.curve.key_size, c2pa.C2paSigningAlg.ES512)
    if isinstance(key, rsa.RSAPrivateKey):
        return c2pa.C2paSigningAlg.PS256
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return c2pa.C2paSigningAlg.ED25519
    raise ValueError(f"a {type(key).__name__} cannot sign C2PA manifests (use EC, RSA or Ed25519)")


class ProvenanceSigner:
    """Signs PNGs with one deployment's certificate; safe to share between job threads
    (each signature builds its own c2pa Builder and Signer)."""

    def __init__(
        self,
        cert_pem: bytes,
        key_pem: bytes,
        tsa_url: str = "",
        include_parameters: bool = True,
    ) -> None:
        self._cert = cert_pem
        self._key = key_pem
        self._alg = _algorithm(key_pem)
        self._tsa_url = tsa_url or None
        self.include_parameters = include_parameters
        self._context = c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}})

    @classmethod
    def from_settings(cls, settings: Settings) -> ProvenanceSigner | None:
        """The deployment's signer, or None when no certificate is configured.

        Raises ``SettingsError`` for half a configuration or unreadable files: a worker
        that was meant to sign must not start unsigned.
        """
        cert, key = settings.provenance_cert, settings.provenance_key
        if not cert and not key:
            return None
        if not cert or not key:
            missing = "IMAGEQ_PROVENANCE_KEY" if cert else "IMAGEQ_PROVENANCE_CERT"
            raise SettingsError([f"{missing}: needed with the other provenance setting"])
        try:
            signer = cls(
                Path(cert).read_bytes(),
                Path(key).read_bytes(),
                settings.provenance_tsa_url,
                settings.provenance_parameters,
            )
        except (OSError, ValueError) as exc:
            raise SettingsError([f"IMAGEQ_PROVENANCE_CERT / _KEY: {exc}"]) from None
        return signer

    def _manifest(self, claim: Claim) -> dict[str, Any]:
        version = imageq_version()
        params: dict[str, Any] = {MODEL_PARAM: claim.model, ADAPTERS_PARAM: claim.adapters}
        if self.include_parameters:
            params[JOB_PARAM] = {k: v for k, v in claim.parameters.items() if v is not None}
        action: dict[str, Any] = {
            "action": claim.origin.value,
            "digitalSourceType": claim.origin.source_type,
            "softwareAgent": {"name": GENERATOR, "version": version},
            "parameters": params,
        }
        actions = [action]
        if claim.origin is Origin.EDITED:
            # C2PA 2.x: a manifest's first action is created or opened; an edit opens
            # its input (the parentOf ingredient, linked by its label).
            opened = {"action": "c2pa.opened", "parameters": {"ingredientIds": [INPUT_LABEL]}}
            actions.insert(0, opened)
        return {
            "claim_generator_info": [{"name": GENERATOR, "version": version}],
            "title": claim.title,
            "format": "image/png",
            "assertions": [{"label": "c2pa.actions.v2", "data": {"actions": actions}}],
        }

    def sign(self, png: bytes, claim: Claim) -> bytes:
        """``png`` with a manifest stating ``claim``, signed; the pixels and the other
        chunks (parameters text, XMP) are kept."""
        if claim.origin is Origin.EDITED and claim.ingredient is None:
            raise ValueError("an edited output's manifest needs its input as an ingredient")
        signer = c2pa.Signer.from_info(
            c2pa.C2paSignerInfo(self._alg, self._cert, self._key, self._tsa_url)
        )
        with signer, c2pa.Builder(self._manifest(claim), self._context) as builder:
            if claim.ingredient is not None:
                ingredient = claim.ingredient
                builder.add_ingredient(
                    {"title": ingredient.title, "relationship": "parentOf", "label": INPUT_LABEL},
                    ingredient.mime,
                    io.BytesIO(ingredient.data),
                )
            out = io.BytesIO()
            builder.sign(signer, "image/png", io.BytesIO(png), out)
        return out.getvalue()
