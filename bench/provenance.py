"""The cost of signing diffusion outputs with C2PA manifests (workers/provenance).

``python -m bench.provenance [--images N] [--side 512]`` makes N PNGs as a diffusion
worker does (``encode_png``: A1111 parameters and XMP) from smooth images with noise (a
generated image's PNG size, not a flat colour's), signs each with a development chain
the way the handler does (``generate``: no ingredient; ``inpaint``: its 512x512 JPEG
input as the ingredient) and prints, per kind, milliseconds per image and bytes added,
beside the encoding's own milliseconds for scale.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imageq.workers.predictors.diffusion_png import encode_png
from imageq.workers.provenance.claims import Origin
from imageq.workers.provenance.devchain import make_dev_chain
from imageq.workers.provenance.signing import Claim, Ingredient, ProvenanceSigner

PARAMETERS: dict[str, Any] = {
    "prompt": "a lighthouse on a cliff at dusk, oil painting",
    "negative_prompt": "blurry",
    "steps": 30,
    "sampler": "Euler a",
    "scheduler": "euler_a",
    "guidance_scale": 7.5,
    "seed": 1,
    "model": "stable-diffusion-v1-5",
    "adapters": [],
}


def picture(seed: int, side: int) -> Image.Image:
    """A gradient with noise: compresses about as a generated image does."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, side, dtype=np.float32)
    base = ramp[None, :, None] + ramp[:, None, None] * 0.2 + rng.normal(0, 12, (side, side, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def run(images: int, side: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        chain = make_dev_chain(Path(tmp))
        signer = ProvenanceSigner(chain.cert.read_bytes(), chain.key.read_bytes())
    source = io.BytesIO()
    picture(10_000, side).save(source, format="JPEG", quality=90)
    ingredient = Ingredient(source.getvalue(), "image/jpeg")
    report: dict[str, Any] = {"images": images, "side": side}
    for kind, origin in (("generate", Origin.CREATED), ("inpaint", Origin.EDITED)):
        encode_ms, sign_ms, added, sizes = [], [], [], []
        for seed in range(images):
            image, params = picture(seed, side), {**PARAMETERS, "seed": seed}
            params.update(width=side, height=side)
            start = time.perf_counter()
            png = encode_png(image, params, origin)
            encoded = time.perf_counter()
            claim = Claim(origin, "stable-diffusion-v1-5", [], params, None, "image-0.png")
            if origin is Origin.EDITED:
                claim = Claim(origin, claim.model, [], params, ingredient, claim.title)
            signed = signer.sign(png, claim)
            done = time.perf_counter()
            encode_ms.append((encoded - start) * 1000)
            sign_ms.append((done - encoded) * 1000)
            added.append(len(signed) - len(png))
            sizes.append(len(png))
        report[kind] = {
            "sign_ms_per_image": round(statistics.median(sign_ms), 1),
            "encode_ms_per_image": round(statistics.median(encode_ms), 1),
            "bytes_added": int(statistics.median(added)),
            "png_bytes": int(statistics.median(sizes)),
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--side", type=int, default=512)
    args = parser.parse_args()
    print(json.dumps(run(args.images, args.side), indent=2))


if __name__ == "__main__":
    main()
