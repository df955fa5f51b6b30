"""``auto_caption`` captions in the fine-tune's own process on the tiny BLIP: no caption
jobs (nothing sent to a broker, no ``Client``), progress per batch, and a cancel that
stops it between batches."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from imageq.api_client.client import Client
from imageq.api_client.errors import Canceled
from imageq.api_client.settings import Settings
from imageq.workers.predictors.caption import CaptionItem, CaptionPredictor, CaptionResult
from imageq.workers.training import autocaption
from imageq.workers.training.autocaption import BATCH_IMAGES, auto_caption
from imageq.workers.training.datasets import Example
from tests.helpers import cells

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def examples(root: Path, n: int) -> list[Example]:
    root.mkdir()
    out = []
    for i in range(n):
        path = root / f"{i}.png"
        cells(i).save(path)
        out.append(Example(file_name=path.name, path=path, text=None))
    return out


class CountingPredictor(CaptionPredictor):
    """Records the size of every forward pass."""

    def __init__(self, model_id: str) -> None:
        super().__init__(model_id)
        self.passes: list[int] = []

    def predict(self, batch: Sequence[CaptionItem]) -> list[CaptionResult]:
        self.passes.append(len(batch))
        return super().predict(batch)


@pytest.fixture
def no_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything submits a job or sends a Celery task."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("auto_caption submitted a job")

    from celery import Celery

    monkeypatch.setattr(Celery, "send_task", refuse)
    for method in ("submit", "caption", "_send"):
        if hasattr(Client, method):
            monkeypatch.setattr(Client, method, refuse)
    monkeypatch.setattr(Client, "__init__", refuse)


@pytest.mark.usefixtures("no_jobs")
def test_auto_caption_loads_the_caption_model_and_captions_in_process(
    tiny_caption_model: Path, tmp_path: Path
) -> None:
    settings = Settings(model_caption=str(tiny_caption_model))
    predictor = CountingPredictor(str(tiny_caption_model))
    predictor.setup("cpu")
    found = examples(tmp_path / "data", BATCH_IMAGES + 3)
    predictor.passes.clear()  # the warm-up's
    reports: list[tuple[int, int]] = []
    texts = auto_caption(
        found, settings, "cpu", lambda: None, lambda d, t: reports.append((d, t)), predictor
    )
    assert predictor.passes == [BATCH_IMAGES, 3]
    assert reports == [(BATCH_IMAGES, len(found)), (len(found), len(found))]
    expected = [
        r.text.strip() for r in predictor.predict([CaptionItem(e.load(settings)) for e in found])
    ]
    assert texts == dict(zip([e.file_name for e in found], expected, strict=True))


def test_auto_caption_stops_between_batches_on_cancel(
    tiny_caption_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(model_caption=str(tiny_caption_model))
    found = examples(tmp_path / "data", 2 * BATCH_IMAGES + 1)
    reports: list[tuple[int, int]] = []
    released: list[bool] = []
    real_release = autocaption._release

    def release(predictor: CaptionPredictor, device: str) -> None:
        real_release(predictor, device)
        released.append(predictor.model is None)

    monkeypatch.setattr(autocaption, "_release", release)

    def check() -> None:
        if reports:
            raise Canceled("canceled")

    with pytest.raises(Canceled):
        # No predictor given: auto_caption loads IMAGEQ_MODEL_CAPTION itself.
        auto_caption(found, settings, "cpu", check, lambda d, t: reports.append((d, t)))
    assert reports == [(BATCH_IMAGES, len(found))]
    # The model it loaded is released even when canceled, before training would load its own.
    assert released == [True]
