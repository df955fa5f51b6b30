"""A self-signed development chain for C2PA signing: ``imageq provenance init``.

c2pa checks the signing certificate against its profile (C2PA 2.x, §14.5): an
end-entity certificate (not a CA) with the ``digitalSignature`` key usage and an
extended key usage such as ``emailProtection`` or the C2PA one, issued by a CA. So the
chain is two certificates: a CA and a signing certificate it issued. Keys are ECDSA
P-256 (ES256). Nothing here is trusted by a verifier: for development only.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

#: The C2PA signing EKU (id-kp-c2pa, C2PA 2.1 §14.5.1).
C2PA_SIGNING_EKU = ObjectIdentifier("1.3.6.1.4.1.62558.2.1")
CERT_FILE, KEY_FILE, CA_FILE = "c2pa-chain.pem", "c2pa-signer.key", "c2pa-ca.pem"
VALID_DAYS = 365


@dataclass(frozen=True)
class DevChain:
    """Where ``make_dev_chain`` wrote its files."""

    #: The signing certificate then the CA's, PEM: what IMAGEQ_PROVENANCE_CERT names.
    cert: Path
    #: The signing certificate's private key, PKCS#8 PEM: IMAGEQ_PROVENANCE_KEY.
    key: Path
    #: The CA alone: what a verifier would add to its trust list to trust these outputs.
    ca: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "imageq development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_dev_chain(directory: Path, organization: str = "imageq") -> DevChain:
    """Write a CA, a signing certificate it issued and that certificate's key into
    ``directory`` (created if missing; existing files are replaced)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    # Backdated a little: a verifier whose clock lags must not see a future certificate.
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"{organization} development CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{organization} development signer"))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION, C2PA_SIGNING_EKU]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    chain = DevChain(directory / CERT_FILE, directory / KEY_FILE, directory / CA_FILE)
    chain.cert.write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    chain.ca.write_bytes(ca.public_bytes(pem))
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    chain.key.touch(mode=0o600)  # the key is never readable by others, not even briefly
    chain.key.chmod(0o600)  # a key file left by an earlier run keeps its own mode otherwise
    chain.key.write_bytes(key_pem)
    return chain


def _usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
