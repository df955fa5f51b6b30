"""The baseline: a bare Celery task that calls the same caption model directly.

Started by ``bench/queue_overhead.py`` as ``celery -A bench.bare_app worker``; the model
path and broker come from the environment it is given (BENCH_* variables).
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
    from workers.predictors.caption import CaptionPredictor

    predictor = CaptionPredictor(os.environ["BENCH_MODEL"], half_precision=False)
    predictor.setup("cpu")
    _model["predictor"] = predictor


@app.task(name="bare.caption")
def caption(image_b64: str) -> str:
    import base64
    import io

    from PIL import Image

    from api_client.inputs import GenerationOptions
    from workers.predictors.caption import CaptionItem

    image = Image.open(io.BytesIO(base64.b64decode(image_b64))).convert("RGB")
    item = CaptionItem(image=image, prompt=None, generation=GenerationOptions())
    return str(_model["predictor"].predict([item])[0].texts[0])
