"""C2PA manifests and the IPTC source type on diffusion outputs (workers/provenance).

Outputs are PNGs from the diffusion_png helpers, signed by the diffusion handler's own
path (``DiffusionHandler._output``) and read back by c2pa's Reader. The development
chain is on no trust list: the Reader reports its signature valid and the signer
untrusted (``Verdict.VALID``), and trusted once its CA is given (``Verdict.TRUSTED``).
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from PIL import Image

from imageq.api_client.settings import Settings, SettingsError
from imageq.workers.kinds.diffusion import DiffusionHandler, _ingredient, _signer
from imageq.workers.ops.cli import main as workers_main
from imageq.workers.predictors.diffusion import GeneratedImage
from imageq.workers.predictors.diffusion_png import read_parameters, read_png_source_type
from imageq.workers.provenance.claims import Origin
from imageq.workers.provenance.devchain import C2PA_SIGNING_EKU, DevChain, make_dev_chain
from imageq.workers.provenance.signing import (
    ADAPTERS_PARAM,
    JOB_PARAM,
    MODEL_PARAM,
    UNSIGNED_WARNING,
    Claim,
    Ingredient,
    ProvenanceSigner,
)
from imageq.workers.provenance.verify import UNTRUSTED, Verdict, Verification, verify

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
COMPOSITE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> DevChain:
    return make_dev_chain(tmp_path_factory.mktemp("c2pa"))


@pytest.fixture(scope="module")
def signer(chain: DevChain) -> ProvenanceSigner:
    return ProvenanceSigner(chain.cert.read_bytes(), chain.key.read_bytes())


def noise(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def output(origin: Origin, seed: int = 1, **extra: Any) -> GeneratedImage:
    params: dict[str, Any] = {
        "prompt": "a lighthouse",
        "negative_prompt": None,
        "steps": 3,
        "scheduler": "euler",
        "sampler": "Euler",
        "guidance_scale": 7.5,
        "seed": seed,
        "width": 64,
        "height": 64,
        "model": "tiny-sd",
        "adapters": [{"name": "watercolor", "scale": 0.8}],
        **extra,
    }
    return GeneratedImage(noise(seed), seed, params, origin=origin)


class Outputs:
    """What the handler stores (its ``ctx.put_output``)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.settings = Settings.from_env({})

    def put_output(self, job_id: str, name: str, data: bytes, content_type: str) -> Any:
        self.files[name] = data
        return {"uri": f"file:///jobs/{job_id}/{name}"}


def handler_pngs(
    signer: ProvenanceSigner | None, image: GeneratedImage, ingredient: Ingredient | None = None
) -> bytes:
    ctx = Outputs()
    handler = DiffusionHandler(ctx, None, None, None, signer)
    handler._output("job-1", [image], [], ingredient)
    return ctx.files["image-0.png"]


def tamper_one_pixel(png: bytes) -> bytes:
    """``png`` with one pixel changed and every other chunk (the manifest) kept."""
    pixels = np.array(Image.open(io.BytesIO(png)))
    pixels[3, 3, 0] ^= 1
    idat = b"".join(c for kind, c in chunks(png_bytes(Image.fromarray(pixels))) if kind == b"IDAT")
    out, placed = [], False
    for kind, c in chunks(png):
        if kind != b"IDAT":
            out.append(c)
        elif not placed:
            out.append(idat)
            placed = True
    return png[:8] + b"".join(out)


def chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    found, i = [], 8
    while i < len(png):
        n = int.from_bytes(png[i : i + 4], "big")
        found.append((png[i + 4 : i + 8], png[i : i + 12 + n]))
        i += 12 + n
    return found


def the_action(result: Verification, name: str) -> dict[str, Any]:
    return next(a for a in result.actions() if a["action"] == name)


@pytest.mark.parametrize(
    ("kind", "origin", "source_type"),
    [
        ("generate", Origin.CREATED, TRAINED),
        ("inpaint", Origin.EDITED, COMPOSITE),
        ("style", Origin.EDITED, COMPOSITE),
    ],
)
def test_every_diffusion_kind_is_signed_and_validates(
    signer: ProvenanceSigner, chain: DevChain, kind: str, origin: Origin, source_type: str
) -> None:
    extra = {} if kind == "generate" else {"strength": 0.6}
    image = output(origin, **extra)
    source = png_bytes(noise(99), "JPEG")
    ingredient = None if origin is Origin.CREATED else Ingredient(source, "image/jpeg")
    png = handler_pngs(signer, image, ingredient)

    result = verify(png)
    # Signature and hashes valid; the development signer is on no trust list.
    assert result.verdict is Verdict.VALID and result.failures == [UNTRUSTED]
    assert verify(png, trust_anchors=chain.ca.read_bytes()).verdict is Verdict.TRUSTED
    manifest = result.active_manifest()
    assert manifest["claim_generator_info"][0]["name"] == "imageq"
    action = the_action(result, origin.value)
    assert action["digitalSourceType"] == source_type
    assert action["softwareAgent"]["name"] == "imageq"
    assert action["parameters"][MODEL_PARAM] == "tiny-sd"
    assert action["parameters"][ADAPTERS_PARAM] == ["watercolor"]
    assert action["parameters"][JOB_PARAM]["prompt"] == "a lighthouse"
    assert action["parameters"][JOB_PARAM]["seed"] == 1
    if origin is Origin.EDITED:
        assert result.actions()[0]["action"] == "c2pa.opened"
        (ingredient_entry,) = manifest["ingredients"]
        assert ingredient_entry["relationship"] == "parentOf"
        assert ingredient_entry["format"] == "image/jpeg"
    # What existed before provenance stays: the A1111 text, the pixels; plus the XMP.
    assert read_parameters(png) == read_parameters(image.png())
    assert read_png_source_type(png) == source_type
    assert np.array_equal(np.array(Image.open(io.BytesIO(png))), np.array(image.image))


def test_a_changed_pixel_fails_validation(signer: ProvenanceSigner, chain: DevChain) -> None:
    png = handler_pngs(signer, output(Origin.CREATED))
    tampered = tamper_one_pixel(png)
    result = verify(tampered, trust_anchors=chain.ca.read_bytes())
    assert result.verdict is Verdict.INVALID and not result.verdict.validates
    assert "assertion.dataHash.mismatch" in result.failures


def test_unsigned_outputs_still_carry_the_source_type(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings.from_env({})  # the shipped defaults: no certificate
    assert settings.provenance_cert == "" and settings.provenance_parameters is True
    with caplog.at_level(logging.WARNING):
        assert _signer(settings) is None
    assert UNSIGNED_WARNING in caplog.text and "imageq provenance init" in caplog.text
    for origin, source_type in ((Origin.CREATED, TRAINED), (Origin.EDITED, COMPOSITE)):
        png = handler_pngs(None, output(origin))
        assert read_png_source_type(png) == source_type
        assert verify(png).verdict is Verdict.NO_MANIFEST


def test_unsigned_encoding_stays_deterministic() -> None:
    assert output(Origin.CREATED).png() == output(Origin.CREATED).png()


def test_parameters_can_be_left_out(chain: DevChain) -> None:
    private = ProvenanceSigner(
        chain.cert.read_bytes(), chain.key.read_bytes(), include_parameters=False
    )
    result = verify(handler_pngs(private, output(Origin.CREATED)))
    params = the_action(result, "c2pa.created")["parameters"]
    assert JOB_PARAM not in params and params[MODEL_PARAM] == "tiny-sd"


def test_an_edit_needs_its_input(signer: ProvenanceSigner) -> None:
    with pytest.raises(ValueError, match="ingredient"):
        signer.sign(output(Origin.EDITED).png(), Claim(Origin.EDITED, "tiny-sd"))


def test_a_bmp_input_becomes_a_png_ingredient() -> None:
    image = noise(3)
    assert _ingredient(png_bytes(image, "BMP"), image).mime == "image/png"
    jpeg = png_bytes(image, "JPEG")
    assert _ingredient(jpeg, image) == Ingredient(jpeg, "image/jpeg")


def test_settings_half_configured_or_unreadable_refuse_to_start(
    chain: DevChain, tmp_path: Path
) -> None:
    with pytest.raises(SettingsError, match="IMAGEQ_PROVENANCE_KEY"):
        ProvenanceSigner.from_settings(Settings.from_env({}, provenance_cert=str(chain.cert)))
    missing = Settings.from_env(
        {}, provenance_cert=str(chain.cert), provenance_key=str(tmp_path / "none.key")
    )
    with pytest.raises(SettingsError, match="PROVENANCE"):
        ProvenanceSigner.from_settings(missing)
    configured = Settings.from_env(
        {"IMAGEQ_PROVENANCE_CERT": str(chain.cert), "IMAGEQ_PROVENANCE_KEY": str(chain.key)}
    )
    assert isinstance(ProvenanceSigner.from_settings(configured), ProvenanceSigner)


def test_dev_chain_fits_the_c2pa_certificate_profile(chain: DevChain) -> None:
    signing, ca = x509.load_pem_x509_certificates(chain.cert.read_bytes())
    assert not signing.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert signing.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    ekus = signing.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.EMAIL_PROTECTION in ekus and C2PA_SIGNING_EKU in ekus
    assert signing.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert chain.key.stat().st_mode & 0o077 == 0


def test_cli_init_then_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert workers_main(["provenance", "init", str(tmp_path / "dev")]) == 0
    out, err = capsys.readouterr()
    settings = dict(line.split("=", 1) for line in out.splitlines())
    assert set(settings) == {"IMAGEQ_PROVENANCE_CERT", "IMAGEQ_PROVENANCE_KEY"}
    assert "development" in err.lower() and "trust" in err
    configured = Settings.from_env(settings)
    signer = ProvenanceSigner.from_settings(configured)
    assert signer is not None
    png = handler_pngs(signer, output(Origin.CREATED))
    signed, tampered, plain = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    signed.write_bytes(png)
    tampered.write_bytes(tamper_one_pixel(png))
    plain.write_bytes(output(Origin.CREATED).png())

    assert workers_main(["verify", str(signed)]) == 0
    out, err = capsys.readouterr()
    assert '"active_manifest"' in out and "valid" in err and "trust" in err
    ca = tmp_path / "dev" / "c2pa-ca.pem"
    assert workers_main(["verify", str(signed), "--trust", str(ca)]) == 0
    assert ": trusted:" in capsys.readouterr().err
    assert workers_main(["verify", str(tampered)]) == 1
    assert "dataHash.mismatch" in capsys.readouterr().err
    assert workers_main(["verify", str(plain)]) == 1
    assert "no C2PA manifest" in capsys.readouterr().err


def test_the_light_cli_hands_both_commands_to_the_worker_side() -> None:
    from imageq.api_client.cli import WORKER_COMMANDS
    from imageq.workers.ops.cli import build_parser

    assert {"provenance", "verify"} <= set(WORKER_COMMANDS)
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(WORKER_COMMANDS) <= set(sub.choices)
