"""A job's images: the pixel budget before any decode, reduced decodes, one at a time."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image, ImageFile

from imageq.api_client.errors import InvalidInput
from imageq.api_client.inputs import CaptionInput, InpaintInput, MatchInput, Resize, StyleInput
from imageq.api_client.settings import Settings
from imageq.workers.io.images import decode_image
from imageq.workers.io.job_images import decode_side, load_job_images
from imageq.workers.io.storage import LocalStorage
from imageq.workers.kinds.caption import PREPROCESSED, CaptionBatcher, CaptionHandler
from imageq.workers.kinds.match import MatchBatcher, MatchHandler
from imageq.workers.predictors.attention import OVERLAY_MAX_PIXELS, OVERLAY_MAX_SIDE, panel_size
from imageq.workers.predictors.blip import DEFAULT_INPUT_SIDE
from imageq.workers.predictors.caption import CaptionItem, CaptionPredictor, CaptionResult
from imageq.workers.predictors.framing import Frame
from imageq.workers.predictors.match import MatchPredictor
from imageq.workers.runtime.context import WorkerContext

SHIPPED = Settings()
JOB = SimpleNamespace(id="j1", tenant=None)


def png(width: int, height: int, mode: str = "L") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), 0).save(out, "PNG")
    return out.getvalue()


def jpeg(width: int, height: int, exif_orientation: int | None = None) -> bytes:
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    exif = Image.Exif()
    if exif_orientation is not None:
        exif[0x0112] = exif_orientation
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, exif=exif)
    return out.getvalue()


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "store", SHIPPED)


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every pixel decode Pillow starts (``load`` of an opened file)."""
    calls: list[str] = []
    real = ImageFile.ImageFile.load

    def load(self: ImageFile.ImageFile) -> Any:
        calls.append(str(self.format))
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


class Control:
    """JobControl's part the handlers use: never stops."""

    def __init__(self) -> None:
        self.metrics: dict[str, Any] = {}

    def check(self) -> None:
        return

    def images_progress(self, stage: str, images: int) -> None:
        return None

    def charge_model(self, seconds: float) -> None:
        self.metrics["model_s"] = self.metrics.get("model_s", 0.0) + seconds


def context(storage: LocalStorage, settings: Settings = SHIPPED) -> WorkerContext:
    return WorkerContext(settings, None, storage, lambda event: None, "test")


# -- the job's pixel budget ----------------------------------------------------------------


def test_the_shipped_budget_refuses_512_refs_to_one_small_png_before_any_decode(
    storage: LocalStorage, decodes: list[str]
) -> None:
    bomb = png(6000, 6000)
    assert len(bomb) < 64 * 1024  # tiny upload, 36 Mpx: under every per-image cap
    storage.put("uploads/bomb.png", bomb, "image/png")
    refs = ["storage://uploads/bomb.png"] * 512
    with pytest.raises(InvalidInput) as refused:
        load_job_images(refs, SHIPPED, storage, 768)
    message = refused.value.message
    assert "max_job_pixels" in message and "IMAGEQ_MAX_JOB_PIXELS" in message
    # 256 Mpx is crossed at the eighth 36 Mpx image.
    assert "256000000" in message and "first 8 already hold 288000000" in message
    assert decodes == []
    assert SHIPPED.max_job_pixels == 256_000_000


def test_a_caption_job_over_the_budget_never_decodes_nor_reaches_the_model(
    storage: LocalStorage, decodes: list[str]
) -> None:
    storage.put("uploads/a.png", png(100, 100), "image/png")
    settings = SHIPPED.with_(max_job_pixels=100 * 100 * 3)
    handler = CaptionHandler(context(storage, settings), Refusing())
    inp = CaptionInput(images=["storage://uploads/a.png"] * 4)
    with pytest.raises(InvalidInput, match=r"IMAGEQ_MAX_JOB_PIXELS\) = 30000 "):
        handler.handle(JOB, inp, Control())
    assert decodes == []
    # Three fit exactly.
    assert len(list(load_job_images(["storage://uploads/a.png"] * 3, settings, storage))) == 3


def test_budget_counts_every_image_of_the_job_and_names_bad_ones(storage: LocalStorage) -> None:
    storage.put("uploads/a.png", png(10, 10), "image/png")
    storage.put("uploads/bad.png", b"not an image", "image/png")
    with pytest.raises(InvalidInput, match=r"input.images\[1\]: not a JPEG"):
        load_job_images(["storage://uploads/a.png", "storage://uploads/bad.png"], SHIPPED, storage)


def test_inpaint_and_style_images_share_the_budget(
    storage: LocalStorage, decodes: list[str]
) -> None:
    from imageq.workers.kinds.diffusion import DiffusionHandler

    storage.put("uploads/a.png", png(100, 100), "image/png")
    ref = "storage://uploads/a.png"
    settings = SHIPPED.with_(max_job_pixels=100 * 100 * 2 - 1)
    predictor = SimpleNamespace(has_ip_adapter=True)
    handler = DiffusionHandler(context(storage, settings), predictor, Refusing(), None)
    jobs = [
        InpaintInput(image=ref, mask=ref, prompt="a cat"),
        StyleInput(image=ref, style_image=ref, style_prompt="ink"),
    ]
    for inp in jobs:
        with pytest.raises(InvalidInput, match=r"IMAGEQ_MAX_JOB_PIXELS.*first 2 already"):
            handler.handle(JOB, inp, Control())
    assert decodes == []


class Refusing:
    """A batcher that fails the test if anything reaches it."""

    def incoming(self) -> Any:
        from contextlib import nullcontext

        return nullcontext(None)

    def run(self, *args: Any) -> Any:
        raise AssertionError("the model must not see a job over its pixel budget")


# -- reduced decoding ----------------------------------------------------------------------


def test_a_large_jpeg_is_decoded_reduced_but_never_below_the_side_asked(
    decodes: list[str],
) -> None:
    data = jpeg(4000, 3000)
    full = decode_image(data, SHIPPED)
    assert full.size == (4000, 3000)
    reduced = decode_image(data, SHIPPED, 768)
    # DCT scaling by 1/2 (1/4 would leave 750 < 768 px): a quarter of the pixels.
    assert reduced.size == (2000, 1500) and reduced.mode == "RGB"
    assert decode_image(data, SHIPPED, 384).size == (1000, 750)
    assert decode_image(jpeg(500, 400), SHIPPED, 768).size == (500, 400)  # small: as is


def test_reduced_png_and_exif_rotation() -> None:
    assert decode_image(png(6000, 6000), SHIPPED, 768).size == (858, 858)  # 6000 / 7, rounded up
    assert decode_image(png(3000, 800, "P"), SHIPPED, 384).size == (1500, 400)
    rotated = decode_image(jpeg(4000, 3000, exif_orientation=6), SHIPPED, 768)
    assert rotated.size == (1500, 2000)


def test_the_reduced_image_changes_the_models_input_little() -> None:
    from transformers import BlipImageProcessor

    processor = BlipImageProcessor()  # BLIP-base's: 384 x 384, bicubic
    assert (processor.size.height, processor.size.width) == (DEFAULT_INPUT_SIDE,) * 2
    photo = Image.effect_mandelbrot((3000, 2400), (-2.0, -1.2, 0.8, 1.2), 60).convert("RGB")
    out = io.BytesIO()
    photo.save(out, "JPEG", quality=92)
    data = out.getvalue()

    def pixels(image: Image.Image) -> Any:
        return processor(images=[image], return_tensors="pt")["pixel_values"][0]

    full = pixels(decode_image(data, SHIPPED))
    reduced_image = decode_image(data, SHIPPED, decode_side(DEFAULT_INPUT_SIDE))
    assert max(reduced_image.size) < 3000
    # Normalised units: one 8-bit level is ~0.015; measured 0.0008.
    assert float((pixels(reduced_image) - full).abs().mean()) < 0.005


# -- handlers ------------------------------------------------------------------------------


class Recording:
    """A batcher that answers every caption item and keeps the items it saw."""

    def __init__(self) -> None:
        self.items: list[CaptionItem] = []

    def incoming(self) -> Any:
        from contextlib import nullcontext

        return nullcontext(None)

    def run(self, items: list[CaptionItem], *args: Any, **options: Any) -> list[Any]:
        from imageq.workers.runtime.batching import Ran

        self.items = list(items)
        results = [CaptionResult([f"c{i}"]) for i in range(len(items))]
        return [Ran(result, len(items), 1, 0.0, 0.0) for result in results]


def test_caption_handler_keeps_tensors_only_and_overlay_sized_copies(
    storage: LocalStorage,
) -> None:
    storage.put("uploads/big.jpg", jpeg(6000, 4000), "image/jpeg")
    seen: list[tuple[int, int]] = []

    def prepare(image: Image.Image, resize: Resize | None) -> tuple[tuple[int, int], Frame]:
        seen.append(image.size)
        return image.size, Frame(resize or Resize.STRETCH)

    batcher = Recording()
    handler = CaptionHandler(context(storage), batcher, prepare=prepare)
    refs = ["storage://uploads/big.jpg"] * 3
    out = handler.handle(JOB, CaptionInput(images=refs), Control())
    assert [c["text"] for c in out["captions"]] == ["c0", "c1", "c2"]
    # 1/4 DCT scaling: both sides at least 768 (2x BLIP's 384), not 24 Mpx.
    assert seen == [(1500, 1000)] * 3
    assert all(item.image is PREPROCESSED for item in batcher.items)

    # With attention the kept copy draws the panels the full photo drew.
    seen.clear()
    handler.handle(JOB, CaptionInput(images=refs, attention=True), Control())
    assert all(min(size) >= OVERLAY_MAX_SIDE for size in seen)
    limits = {"max_side": OVERLAY_MAX_SIDE, "max_pixels": OVERLAY_MAX_PIXELS}
    for n_tokens in (1, 8, 30):
        was = panel_size((6000, 4000), n_tokens, **limits)
        now = panel_size(batcher.items[0].image.size, n_tokens, **limits)
        assert abs(was[0] - now[0]) <= 1 and abs(was[1] - now[1]) <= 1


@pytest.mark.usefixtures("torch_one_thread")
def test_tiny_caption_and_match_run_on_reduced_images(
    storage: LocalStorage, tiny_caption_model: Path, tiny_match_model: Path
) -> None:
    storage.put("uploads/big.jpg", jpeg(2000, 1600), "image/jpeg")
    refs = ["storage://uploads/big.jpg"] * 2
    ctx = context(storage)

    captioner = CaptionPredictor(str(tiny_caption_model))
    captioner.setup("cpu")
    caption_batcher = CaptionBatcher(captioner, max_batch=4, max_wait_ms=1)
    matcher = MatchPredictor(str(tiny_match_model))
    matcher.setup("cpu")
    match_batcher = MatchBatcher(matcher, max_batch=4, max_wait_ms=1)
    for batcher in (caption_batcher, match_batcher):
        batcher.start()
    try:
        assert captioner.input_side == matcher.input_side == 48  # tiny.TINY_IMAGE_SIZE
        handler = CaptionHandler(
            ctx, caption_batcher, prepare=captioner.prepare, input_side=captioner.input_side
        )
        out = handler.handle(JOB, CaptionInput(images=refs, attention=True), Control())
        assert len(out["captions"]) == 2
        attention = out["captions"][0]["attention"]
        assert max(attention["panel"]) <= OVERLAY_MAX_SIDE
        assert storage.exists("jobs/j1/attention-0.png")

        scores = MatchHandler(ctx, matcher, match_batcher).handle(
            JOB,
            MatchInput(images=refs, texts=["a dog", "a cat"]),
            Control(),
        )
        assert [len(s["itm"]) for s in scores["scores"]] == [2, 2]
    finally:
        for batcher in (caption_batcher, match_batcher):
            batcher.stop()
