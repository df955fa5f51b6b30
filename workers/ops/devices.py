"""Device placement and precision: one worker, one device, chosen once at start.

Pinning: ``imageq worker KIND --device cuda:N`` starts its Celery process with
``CUDA_VISIBLE_DEVICES`` naming only GPU N (``pin_cuda``), so nothing in it can create
a context on another GPU; inside, that GPU is ``cuda:0``. The worker keeps the name
``KIND@gpuN`` from the operator's numbering.

Speed options (``SpeedOptions``, from settings) are applied once when a BLIP predictor
loads its model: the dtype, channels-last memory format and ``torch.compile``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from imageq.api_client.errors import ModelError

if TYPE_CHECKING:
    import torch

    from imageq.api_client.settings import Settings

log = logging.getLogger(__name__)

DTYPES = ("auto", "fp32", "fp16", "bf16")


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda:0`` where CUDA works, else ``cpu``; ``cuda:N`` is checked."""
    import torch

    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelError(f"device {device}: CUDA is not available on this machine")
        index = cuda_index(device)
        if index >= torch.cuda.device_count():
            raise ModelError(
                f"device {device}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
        torch.cuda.set_device(index)
        return f"cuda:{index}"
    raise ModelError(f"device {device!r}: expected cpu, cuda:N or auto")


def cuda_index(device: str) -> int:
    """The ordinal of ``cuda`` / ``cuda:N``; ``ValueError`` for anything else."""
    if device == "cuda":
        return 0
    prefix, _, index = device.partition(":")
    if prefix != "cuda" or not index.isdigit():
        raise ValueError(f"device {device!r}: expected cuda:N")
    return int(index)


def is_cuda(device: str) -> bool:
    return device == "cuda" or device.startswith("cuda:")


def node_suffix(device: str) -> str:
    """``cuda:1`` names a worker ``KIND@gpu1``; a CPU worker is ``KIND@cpu``."""
    if is_cuda(device):
        return f"gpu{cuda_index(device)}"
    return device


def pin_cuda(device: str, env: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """The device string and environment of a process pinned to ``device``.

    ``cuda:N`` means the Nth GPU this process can see: the Nth entry of an inherited
    ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs), else physical GPU N. The child sees
    only that GPU, as ``cuda:0``. Other devices (``cpu``, ``auto``) pass unchanged.
    """
    out = dict(env)
    if not is_cuda(device):
        return device, out
    index = cuda_index(device)
    inherited = env.get("CUDA_VISIBLE_DEVICES")
    if inherited is None or inherited.strip() == "":
        # Unset means every GPU; an empty string would mean none, so a pin over it is
        # as wrong as an index past the end of a list.
        if inherited is not None:
            raise ValueError(f"device {device}: CUDA_VISIBLE_DEVICES is empty (no GPU visible)")
        physical = str(index)
    else:
        visible = [part.strip() for part in inherited.split(",") if part.strip()]
        if index >= len(visible):
            raise ValueError(
                f"device {device}: CUDA_VISIBLE_DEVICES={inherited!r} lists "
                f"{len(visible)} device(s)"
            )
        physical = visible[index]
    out["CUDA_VISIBLE_DEVICES"] = physical
    return "cuda:0", out


@dataclass(frozen=True)
class SpeedOptions:
    """How a predictor runs its model: precision, memory format, compilation."""

    #: ``auto`` (fp16 on CUDA when ``half_precision``, else fp32), ``fp32``, ``fp16``, ``bf16``.
    dtype: str = "auto"
    half_precision: bool = True
    #: Channels-last memory format for the vision encoder's convolution (patch embedding).
    channels_last: bool = False
    #: ``torch.compile`` the vision encoder (compiled at setup, during the warm-up pass).
    torch_compile: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ModelError(f"dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")

    @classmethod
    def from_settings(cls, settings: Settings) -> SpeedOptions:
        return cls(
            dtype=settings.dtype,
            half_precision=settings.half_precision,
            channels_last=settings.channels_last,
            torch_compile=settings.torch_compile,
        )

    def torch_dtype(self, device: str) -> torch.dtype:
        import torch

        if self.dtype == "auto":
            return torch.float16 if self.half_precision and is_cuda(device) else torch.float32
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.dtype]

    def apply_to_vision(self, vision_model: Any) -> None:
        """Channels-last and ``torch.compile`` for a BLIP vision encoder, in place.

        BLIP's attention is written out by hand (eager only, no SDPA variant in
        transformers), so there is no attention backend to choose here.
        """
        import torch

        if self.channels_last:
            # Only 4-D weights (the patch embedding) change layout; a convolution with a
            # channels-last weight runs channels-last whatever the pixels' layout.
            vision_model.to(memory_format=torch.channels_last)
        if self.torch_compile:
            # Compiles lazily at the first call (the predictor's warm-up); batch sizes
            # after the second one seen reuse one dynamic-shape graph.
            vision_model.compile()
            log.info("vision encoder compiled with torch.compile")
