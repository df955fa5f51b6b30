"""Peak memory of loading a caption job's images, before and after the job pixel budget.

``python -m bench.image_memory`` runs each case in a child process of its own and prints
its peak RSS (``ru_maxrss``) above the same process's RSS once imports are done:

- ``bomb``: 512 references to one 6000 x 6000 PNG upload (120 KB: all one colour), the
  job that OOM-killed caption workers. Before: every image decoded at full size and held
  (the old ``load_images``), measured on ``--before-images`` of them and scaled to 512 (the
  growth is linear: each decoded image is a separate 108 MB array). After: refused by
  ``IMAGEQ_MAX_JOB_PIXELS`` from its headers.
- ``seven``: the most 6000 x 6000 images the shipped budget lets through (7 x 36 Mpx).
- ``web``: 512 references to a 707 x 707 image (0.5 Mpx each: 256 Mpx, the budget).

Each image's model input is kept as BLIP's is (3 x 384 x 384 float32, 1.8 MB), as the
handlers keep its tensor. Before: decode_image at full size, all images held, then their
tensors. After: ``load_job_images`` with the caption handler's decode side (768 px), one
image at a time, only the tensor kept.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imageq.api_client.errors import InvalidInput
from imageq.api_client.settings import Settings
from imageq.workers.io.images import decode_image, fetch_bytes
from imageq.workers.io.job_images import decode_side, load_job_images
from imageq.workers.io.storage import LocalStorage
from imageq.workers.predictors.blip import DEFAULT_INPUT_SIDE

CASES = {"bomb": (6000, 512), "seven": (6000, 7), "web": (707, 512)}


def _rss_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tensor(image: Image.Image) -> Any:
    side = DEFAULT_INPUT_SIDE
    resized = image.resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.float32).transpose(2, 0, 1).copy()


def _upload(root: Path, side: int) -> str:
    out = BytesIO()
    Image.new("RGB", (side, side), (90, 120, 150)).save(out, "PNG")
    LocalStorage(root).put("uploads/x.png", out.getvalue(), "image/png")
    return "storage://uploads/x.png"


def child(case: str, mode: str, images: int) -> dict[str, Any]:
    side, count = CASES[case]
    # Only the bomb is too large to load whole before the change (tens of GB).
    count = min(count, images) if (mode, case) == ("before", "bomb") else count
    settings = Settings()
    with tempfile.TemporaryDirectory() as tmp:
        storage = LocalStorage(Path(tmp), settings)
        ref = _upload(Path(tmp), side)
        size = len(storage.get("uploads/x.png"))
        base = _rss_mb()
        kept: list[Any] = []
        outcome = "loaded"
        if mode == "before":
            data = [fetch_bytes(ref, settings, storage) for _ in range(count)]
            decoded = [decode_image(d, settings) for d in data]
            kept = [_tensor(image) for image in decoded]
        else:
            try:
                for image in load_job_images(
                    [ref] * count, settings, storage, decode_side(DEFAULT_INPUT_SIDE)
                ):
                    kept.append(_tensor(image))
            except InvalidInput as exc:
                outcome = f"refused: {exc.message}"
        peak = _rss_mb()
    return {"case": case, "mode": mode, "images": count, "upload_bytes": size,
            "peak_over_base_mb": round(peak - base, 1), "outcome": outcome}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("CASE", "MODE"))
    parser.add_argument("--before-images", type=int, default=8)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.before_images)))
        return
    for case, (_side, count) in CASES.items():
        for mode in ("before", "after"):
            command = [sys.executable, "-m", "bench.image_memory", "--child", case, mode]
            command += ["--before-images", str(args.before_images)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout)
            if result["images"] < count:
                per_image = result["peak_over_base_mb"] / result["images"]
                result["scaled_to_job_mb"] = round(per_image * count)
            print(json.dumps(result))


if __name__ == "__main__":
    main()
