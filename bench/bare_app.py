"""The baseline: a bare Celery task that calls the same caption model directly.

Started by ``bench/queue_overhead.py`` and ``bench/dispatch.py`` as
``celery -A bench.bare_app worker``; the model path and broker come from the environment
it is given (BENCH_* variables). ``bare.preprocess`` is the per-image work of a caption
job without the model and without any bookkeeping: decode the data URI, run BLIP's image
processor, count the job done (one INCR).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals

app = Celery(
    "bare", broker=os.environ.get("BENCH_BROKER_URL"), backend=os.environ.get("BENCH_BROKER_URL")
)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    worker_prefetch_multiplier=1,
    task_acks_late=True,
)
_model: dict[str, Any] = {}


@signals.worker_init.connect
def _load(**_: Any) -> None:
    from imageq.workers.predictors.caption import CaptionPredictor

    predictor = CaptionPredictor(os.environ["BENCH_MODEL"], half_precision=False)
    predictor.setup("cpu")
    _model["predictor"] = predictor


@app.task(name="bare.caption")
def caption(image_b64: str) -> str:
    import base64
    import io

    from PIL import Image

    from imageq.api_client.inputs import GenerationOptions
    from imageq.workers.predictors.caption import CaptionItem

    image = Image.open(io.BytesIO(base64.b64decode(image_b64))).convert("RGB")
    item = CaptionItem(image=image, prompt=None, generation=GenerationOptions())
    return str(_model["predictor"].predict([item])[0].texts[0])


@app.task(name="bare.caption_timed")
def caption_timed(image_b64: str, tokens: int) -> dict[str, Any]:
    """The naive worker of ``python -m bench.batching --defaults``: one image per task,
    captions of a fixed length, and when the model call started and finished."""
    import base64
    import io
    import time

    from PIL import Image

    from imageq.api_client.inputs import GenerationOptions
    from imageq.workers.predictors.caption import CaptionItem

    started = time.time()
    image = Image.open(io.BytesIO(base64.b64decode(image_b64))).convert("RGB")
    options = GenerationOptions(max_new_tokens=tokens, min_new_tokens=tokens)
    text = _model["predictor"].predict([CaptionItem(image, None, options)])[0].texts[0]
    return {"started": started, "finished": time.time(), "text": text}


@app.task(name="bare.preprocess", ignore_result=True)
def preprocess(data_uri: str, counter: str) -> None:
    import base64
    import io

    from PIL import Image

    raw = base64.b64decode(data_uri.split(",", 1)[1])
    image = Image.open(io.BytesIO(raw)).convert("RGB")
    _model["predictor"].processor.image_processor(images=[image], return_tensors="pt")
    if "redis" not in _model:
        import redis

        _model["redis"] = redis.Redis.from_url(os.environ["BENCH_BROKER_URL"])
    _model["redis"].incr(counter)
