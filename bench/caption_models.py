"""The caption model under test: built from code, and run bare in a process of its own.

``build_blip_base`` saves the full-size architecture of
``Salesforce/blip-image-captioning-base`` (ViT-B/16 at 384 px, BERT-base decoder) from
``imageq.workers.testing.tiny.blip_base_caption_config`` with random weights and a tokenizer
of the same vocabulary size: nothing is downloaded, and a forward pass costs what the real model's
does. ``Bare`` holds the same ``CaptionPredictor`` a worker holds, without the queue.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BASE_VOCAB = 30524  # BERT's 30522 + [DEC] + [ENC], as in Salesforce/blip-image-captioning-base


def build_blip_base(path: Path, seed: int = 0) -> Path:
    """Save a random-weight BLIP-base captioner with a tokenizer of its vocabulary size."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    from imageq.workers.testing.tiny import blip_base_caption_config, tiny_vocabulary

    # BERT's layout for the ids the model config names: [PAD]=0, [SEP]=102, [DEC]=30522.
    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [w for w in tiny_vocabulary() if not w.startswith("[")]
    tokens += [f"w{i}" for i in range(BASE_VOCAB - 2 - len(tokens))] + ["[DEC]", "[ENC]"]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 384, "width": 384}),
        tokenizer=tokenizer,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(blip_base_caption_config()).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def build_model(kind: str, path: Path) -> Path:
    if kind == "base":
        return build_blip_base(path)
    from imageq.workers.testing.tiny import build_tiny_caption

    return build_tiny_caption(path)


def photo_jpeg(size: tuple[int, int] = (640, 480)) -> bytes:
    """A photo-sized JPEG with detail (decoding and resizing cost what a photo's would)."""
    from PIL import Image

    image = Image.effect_mandelbrot(size, (-2.0, -1.2, 1.0, 1.2), 60).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


@dataclass(frozen=True)
class Model:
    """What one process loads, and how."""

    path: Path
    device: str
    dtype: str
    threads: int
    tokens: int
    channels_last: bool = False
    torch_compile: bool = False

    def env(self) -> dict[str, str]:
        return {
            "IMAGEQ_DTYPE": self.dtype,
            "IMAGEQ_CHANNELS_LAST": "1" if self.channels_last else "0",
            "IMAGEQ_TORCH_COMPILE": "1" if self.torch_compile else "0",
            "OMP_NUM_THREADS": str(self.threads),
            "MKL_NUM_THREADS": str(self.threads),
            "TOKENIZERS_PARALLELISM": "false",
        }

    def generation(self) -> dict[str, int]:
        return {"max_new_tokens": self.tokens, "min_new_tokens": self.tokens}


# -- the bare model, in a process of its own, driven line by line ---------------------


def bare_child(model: Model) -> None:
    """The child's loop: read "BATCH IMAGES", answer with images/s for that many."""
    import torch
    from PIL import Image

    from imageq.api_client.inputs import GenerationOptions
    from imageq.workers.ops.devices import SpeedOptions
    from imageq.workers.predictors.caption import CaptionItem, CaptionPredictor

    torch.set_num_threads(model.threads)
    speed = SpeedOptions(
        dtype=model.dtype, channels_last=model.channels_last, torch_compile=model.torch_compile
    )
    predictor = CaptionPredictor(str(model.path), speed=speed)
    predictor.setup(model.device)
    image = Image.open(io.BytesIO(photo_jpeg())).convert("RGB")
    options = GenerationOptions(max_new_tokens=model.tokens, min_new_tokens=model.tokens)
    print("READY", flush=True)
    for line in sys.stdin:
        batch, images = (int(part) for part in line.split())
        began = time.perf_counter()
        for start in range(0, images, batch):
            n = min(batch, images - start)
            predictor.predict([CaptionItem(image, None, options) for _ in range(n)])
        if predictor.device.startswith("cuda"):
            torch.cuda.synchronize()
        print(f"RESULT {images / (time.perf_counter() - began)}", flush=True)


class Bare:
    def __init__(self, model: Model, env: dict[str, str]) -> None:
        fields = {**model.__dict__, "path": str(model.path)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.caption_models", json.dumps(fields)],
            env={**env, **model.env()},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._read("READY")

    def _read(self, prefix: str) -> str:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        raise RuntimeError(f"the bare model process exited ({self.process.wait()})")

    def rate(self, batch: int, images: int) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{batch} {images}\n")
        self.process.stdin.flush()
        return float(self._read("RESULT "))

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(60)


if __name__ == "__main__":
    fields = json.loads(sys.argv[1])
    fields["path"] = Path(fields["path"])
    bare_child(Model(**fields))
