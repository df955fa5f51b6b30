"""Signed C2PA manifests through a real diffusion worker (tiny SD pipeline), with a
development chain made by the code behind ``imageq provenance init``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from imageq.workers.predictors.diffusion_png import read_parameters, read_png_source_type
from imageq.workers.provenance.claims import Origin
from imageq.workers.provenance.devchain import DevChain, make_dev_chain
from imageq.workers.provenance.signing import MODEL_PARAM
from imageq.workers.provenance.verify import Verdict, verify
from tests.e2e.test_diffusion import FAST, mask_uri, noise_uri, stored, succeeded
from tests.fixtures.services import Stack


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> DevChain:
    return make_dev_chain(tmp_path_factory.mktemp("c2pa-dev"))


@pytest.fixture(scope="module")
def signing(make_stack: Callable[..., Stack], tiny_sd_model: Path, chain: DevChain) -> Stack:
    stack = make_stack(
        IMAGEQ_MODEL_DIFFUSION=str(tiny_sd_model),
        IMAGEQ_PROVENANCE_CERT=str(chain.cert),
        IMAGEQ_PROVENANCE_KEY=str(chain.key),
    )
    stack.worker("diffusion", "sd@c2pa")
    return stack


def test_generated_and_inpainted_pngs_carry_valid_manifests(
    signing: Stack, chain: DevChain
) -> None:
    ca = chain.ca.read_bytes()
    generated = succeeded(signing, signing.client.generate("a cat", seed=3, **FAST))
    inpainted = succeeded(
        signing, signing.client.inpaint(noise_uri(1), mask_uri(), "a dog", seed=3, steps=3)
    )
    for record, origin in ((generated, Origin.CREATED), (inpainted, Origin.EDITED)):
        (png,) = stored(signing, record)
        result = verify(png, trust_anchors=ca)
        assert result.verdict is Verdict.TRUSTED, result.failures
        action = next(a for a in result.actions() if a["action"] == origin.value)
        assert action["digitalSourceType"] == origin.source_type
        assert action["parameters"][MODEL_PARAM] == Path(signing.settings.model_diffusion).name
        assert read_png_source_type(png) == origin.source_type
        text = read_parameters(png)
        assert text is not None and "Seed: 3" in text
    (inpainted_png,) = stored(signing, inpainted)
    manifest = verify(inpainted_png).active_manifest()
    assert [i["relationship"] for i in manifest["ingredients"]] == ["parentOf"]
