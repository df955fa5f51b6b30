"""``auto_caption``: caption a dataset's unlabelled images inside the fine-tune job.

The finetune worker loads the deployment's caption model (``IMAGEQ_MODEL_CAPTION``, the
caption predictor the caption workers run) and captions the missing texts in batches
in its own process, between the job's ``check`` calls (cancel, timeout) and with a
progress report per batch. It enqueues no caption jobs: jobs enqueued for a tenant's
fine-tune ran outside that tenant's limits (thousands for a big dataset), and the time
captioning takes is the fine-tune's own, charged to its tenant with the rest of it.

Memory: the caption model is loaded before training and released before the trainer
loads its models, so the job's peak is the larger of the two, not their sum (BLIP base
is about 0.5 GB in half precision, less than either trainer).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

from imageq.api_client.errors import ModelError
from imageq.api_client.settings import Settings
from imageq.workers.predictors.caption import CaptionItem, CaptionPredictor
from imageq.workers.training.datasets import Example

# Images per forward pass: enough to keep a GPU busy on BLIP base, small enough that a
# cancel waits for at most one batch.
BATCH_IMAGES = 8

Check = Callable[[], None]
Progress = Callable[[int, int], None]


def auto_caption(
    examples: list[Example],
    settings: Settings,
    device: str,
    check: Check,
    progress: Progress,
    predictor: CaptionPredictor | None = None,
) -> dict[str, str]:
    """Captions for ``examples`` by file name; ``check`` raises to stop (cancel, timeout).

    ``predictor``: an already loaded one (tests); otherwise the caption model is loaded
    here and released before returning.
    """
    owned = predictor is None
    check()
    if predictor is None:
        predictor = CaptionPredictor(settings.model_caption)
        predictor.setup(device)
    try:
        return _caption_all(examples, settings, predictor, check, progress)
    finally:
        if owned:
            _release(predictor, device)


def _caption_all(
    examples: list[Example],
    settings: Settings,
    predictor: CaptionPredictor,
    check: Check,
    progress: Progress,
) -> dict[str, str]:
    texts: dict[str, str] = {}
    for start in range(0, len(examples), BATCH_IMAGES):
        check()
        chunk = examples[start : start + BATCH_IMAGES]
        results = predictor.predict([CaptionItem(image=e.load(settings)) for e in chunk])
        for example, result in zip(chunk, results, strict=True):
            text = result.text.strip()
            if not text:
                raise ModelError(f"auto_caption: {example.file_name}: the caption came back empty")
            texts[example.file_name] = text
        progress(len(texts), len(examples))
    return texts


def _release(predictor: CaptionPredictor, device: str) -> None:
    """Hand the caption model's memory back before the trainer loads its own."""
    predictor.model = None
    predictor.processor = None
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
