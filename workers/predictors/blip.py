"""Loading BLIP checkpoints: what the caption and match predictors (and caption
training) share.

Weights come from safetensors only, and a checkpoint of the wrong architecture is
refused instead of served with invented weights; the serving predictors then apply the
worker's speed options and warm up once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from api_client.errors import ImageqError, ModelError
from workers.ops.devices import SpeedOptions
from workers.predictors.base import check_local_model, model_errors

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = ["DEFAULT_INPUT_SIDE", "BlipPredictor", "check_local_model", "load_checked"]

# BLIP-base's processor resizes every image to 384 x 384; the side assumed before setup.
DEFAULT_INPUT_SIDE = 384


def load_checked(model_class: Any, model_id: str, dtype: torch.dtype) -> Any:
    """``from_pretrained`` (safetensors only) that refuses weights it had to invent.

    transformers fills weights missing from a checkpoint with random values and only
    logs it, so a checkpoint of the wrong architecture would serve noise.
    """
    model, info = model_class.from_pretrained(
        model_id, use_safetensors=True, dtype=dtype, output_loading_info=True
    )
    # Wrong shapes already raise inside from_pretrained; missing weights only log.
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelError(
            f"{model_id} is not a {model_class.__name__} checkpoint: {len(missing)} "
            f"weight(s) missing, e.g. {missing[:3]}"
        )
    return model


class BlipPredictor:
    """One warm BLIP model and its processor; nothing loads before ``setup``.

    Subclasses name the transformers class to load (``_model_class``) and run one
    small batch in ``_warm_up``.
    """

    #: Names the model in errors: "cannot load caption model ...".
    kind = "BLIP"

    def __init__(
        self, model_id: str, *, half_precision: bool = True, speed: SpeedOptions | None = None
    ) -> None:
        self.model_id = model_id
        self.half_precision = half_precision
        self.speed = speed or SpeedOptions(half_precision=half_precision)
        self.device = "cpu"
        self.model: Any = None
        self.processor: Any = None

    def setup(self, device: str) -> None:
        from transformers import BlipProcessor

        from workers.ops.devices import resolve_device

        try:
            check_local_model(self.model_id)
            self.device = resolve_device(device)
            dtype = self.speed.torch_dtype(self.device)
            model = load_checked(self._model_class(), self.model_id, dtype)
            self.model = model.to(self.device).eval()
            # Before the warm-up pass, which is where torch.compile compiles.
            self.speed.apply_to_vision(self.model.vision_model)
            self.processor = BlipProcessor.from_pretrained(self.model_id)
            self._loaded()
            self._warm_up()
        except Exception as exc:
            self._unload()
            reason = exc.message if isinstance(exc, ImageqError) else f"{type(exc).__name__}: {exc}"
            raise ModelError(f"cannot load {self.kind} model {self.model_id!r}: {reason}") from exc

    def _model_class(self) -> Any:
        """The transformers class to load (imported late: no torch at import time)."""
        raise NotImplementedError

    def _loaded(self) -> None:
        """Derive what the predictor needs from the model and processor, before warm-up."""

    def _warm_up(self) -> None:
        raise NotImplementedError

    def _unload(self) -> None:
        # A half-loaded model must not serve: every entry point checks for None.
        self.model = None

    def _require_model(self) -> Any:
        if self.model is None:
            raise ModelError(f"{self.kind} model is not loaded: call setup() first")
        return self.model

    # -- pixels -----------------------------------------------------------------------
    @property
    def input_side(self) -> int:
        """The longer side of the vision encoder's input (384 for BLIP-base)."""
        size = getattr(getattr(self.processor, "image_processor", None), "size", None)
        # A dict in older transformers, a SizeDict (attributes) in newer ones.
        read = size.get if isinstance(size, dict) else lambda name: getattr(size, name, None)
        sides = [read(name) for name in ("height", "width", "shortest_edge", "longest_edge")]
        known = [int(side) for side in sides if isinstance(side, int) and side > 0]
        return max(known) if known else DEFAULT_INPUT_SIDE

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One image as the vision encoder takes it: ``[3, H, W]`` float32, on the CPU.

        Job threads call this before their images join a batch. Resizing and normalising
        cost milliseconds per image (a 384 px bicubic resize of a photo), and on the
        batcher thread they would run in series with the model; PIL's resize and the
        array arithmetic release the GIL, so job threads do it on other cores while the
        model runs. The processor gives one image the values it gives it in a batch.
        """
        self._require_model()
        # As inside ``predict``: a failure is this image's model_error.
        with model_errors(self.kind):
            processed = self.processor.image_processor(
                images=[image.convert("RGB")], return_tensors="pt"
            )
        pixels: torch.Tensor = processed["pixel_values"][0]
        return pixels

    def pixel_batch(
        self, images: Sequence[Image.Image], ready: Sequence[torch.Tensor | None]
    ) -> torch.Tensor:
        """A batch's pixels on the model's device: ``ready[i]`` if the job thread made
        them (``preprocess``), else made now from ``images[i]``."""
        import torch

        rows = [
            pixels if pixels is not None else self.preprocess(image)
            for image, pixels in zip(images, ready, strict=True)
        ]
        return torch.stack(rows).to(self.device, self.model.dtype)
