"""Loading BLIP checkpoints: what the caption and match predictors (and caption
training) share.

Weights come from safetensors only, and a checkpoint of the wrong architecture is
refused instead of served with invented weights; the serving predictors then apply the
worker's speed options and warm up once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from imageq.api_client.errors import ImageqError, ModelError
from imageq.workers.ops.devices import SpeedOptions
from imageq.workers.predictors.base import check_local_model, model_errors

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from imageq.workers.predictors.framing import Frame, Resize

__all__ = [
    "DEFAULT_INPUT_SIDE",
    "ROLE_IDS",
    "BlipPredictor",
    "check_local_model",
    "load_checked",
    "role_ids",
]

# BLIP-base's processor resizes every image to 384 x 384; the side assumed before setup.
DEFAULT_INPUT_SIDE = 384


#: The config fields naming ids the model gives a role, whatever its tokenizer lists.
ROLE_IDS = (
    "bos_token_id",
    "pad_token_id",
    "sep_token_id",
    "eos_token_id",
    "decoder_start_token_id",
)


def role_ids(*configs: Any) -> set[int]:
    """Every id the configs (BLIP's and its text config) name in ``ROLE_IDS``."""
    found: set[int] = set()
    for config in configs:
        for name in ROLE_IDS:
            value = getattr(config, name, None)
            values = value if isinstance(value, list | tuple) else [value]
            found.update(v for v in values if isinstance(v, int) and v >= 0)
    return found


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

        from imageq.workers.ops.devices import resolve_device

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

    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height) of the vision encoder's input (384 x 384 for BLIP-base)."""
        size = getattr(getattr(self.processor, "image_processor", None), "size", None)
        read = size.get if isinstance(size, dict) else lambda name: getattr(size, name, None)
        width, height = read("width"), read("height")
        if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
            return width, height
        return self.input_side, self.input_side

    @property
    def fill(self) -> tuple[int, int, int]:
        """The processor's mean colour: letterbox padding normalises to exactly zero."""
        mean = getattr(getattr(self.processor, "image_processor", None), "image_mean", None)
        if not isinstance(mean, list | tuple) or len(mean) != 3:
            return (0, 0, 0)
        red, green, blue = (round(255 * float(m)) for m in mean)
        return red, green, blue

    def prepare(
        self, image: Image.Image, resize: Resize | None = None
    ) -> tuple[torch.Tensor, Frame]:
        """``preprocess`` and where the image lies on the input (``framing.Frame``).

        ``resize`` None: the processor's own behaviour (BLIP's stretches).
        """
        from imageq.workers.predictors.framing import Frame, Resize, framed

        if resize is None or resize is Resize.STRETCH:
            return self._pixels(image), Frame(Resize.STRETCH)
        shaped, frame = framed(image.convert("RGB"), resize, self.input_size, self.fill)
        return self._pixels(shaped), frame

    def preprocess(self, image: Image.Image, resize: Resize | None = None) -> torch.Tensor:
        """One image as the vision encoder takes it: ``[3, H, W]`` float32, on the CPU.

        Job threads call this before their images join a batch. Resizing and normalising
        cost milliseconds per image (a 384 px bicubic resize of a photo), and on the
        batcher thread they would run in series with the model; PIL's resize and the
        array arithmetic release the GIL, so job threads do it on other cores while the
        model runs. The processor gives one image the values it gives it in a batch.
        Every ``resize`` gives a tensor of the same size, so modes share batches.
        """
        return self.prepare(image, resize)[0]

    def _pixels(self, image: Image.Image) -> torch.Tensor:
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
