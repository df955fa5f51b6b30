"""``imageq provenance init [DIR]`` and ``imageq verify FILE [--trust CA.pem]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from imageq.workers.provenance.devchain import make_dev_chain
from imageq.workers.provenance.verify import Verdict, verify


def provenance_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="imageq provenance")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("init", help="make a self-signed C2PA chain, for development only")
    p.add_argument("dir", nargs="?", default="imageq-provenance", type=Path)
    args = parser.parse_args(argv)
    chain = make_dev_chain(args.dir)
    print(f"IMAGEQ_PROVENANCE_CERT={chain.cert.resolve()}")
    print(f"IMAGEQ_PROVENANCE_KEY={chain.key.resolve()}")
    print(
        "imageq provenance: a self-signed DEVELOPMENT chain; no verifier trusts it (they "
        "report the signature valid, the signer untrusted). Production needs a "
        "certificate from a CA on the C2PA trust list. To trust this one locally: "
        f"imageq verify FILE --trust {chain.ca.resolve()}",
        file=sys.stderr,
    )
    return 0


def verify_main(argv: list[str]) -> int:
    """Print FILE's manifest store (JSON) on stdout and the verdict on stderr; exit 0 when
    the signature and hashes hold, 1 when they do not or there is no manifest."""
    parser = argparse.ArgumentParser(prog="imageq verify")
    parser.add_argument("file", type=Path)
    parser.add_argument("--trust", type=Path, help="PEM CA certificates to trust")
    parser.add_argument("--format", default="image/png", help="the file's MIME type")
    args = parser.parse_args(argv)
    trust = args.trust.read_bytes() if args.trust else None
    result = verify(args.file.read_bytes(), args.format, trust)
    print(json.dumps(result.store, indent=2))
    detail = {
        Verdict.TRUSTED: "the signature is valid and the signer trusted",
        Verdict.VALID: "the signature is valid; the signer is on no trust list given",
        Verdict.INVALID: "validation FAILED: " + ", ".join(result.failures),
        Verdict.NO_MANIFEST: "no C2PA manifest",
    }[result.verdict]
    print(f"imageq verify: {args.file}: {result.verdict.value}: {detail}", file=sys.stderr)
    return 0 if result.verdict.validates else 1
