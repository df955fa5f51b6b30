"""Step previews: a diffusion job's current latents as a small JPEG.

Two decoders. ``LinearDecoder`` (the default) maps each latent pixel's 4 channels to
RGB with the well-known fixed SD 1.x factors (ComfyUI's ``latent_rgb_factors``): no
weights, about a millisecond for a 64x64 latent. ``TinyDecoder`` runs a diffusers
``AutoencoderTiny`` (TAESD) from a local directory (IMAGEQ_PREVIEW_DECODER): closer to
the real VAE's image, tens of milliseconds on a CPU.

The pipeline's thread only slices the latents and copies them to the CPU
(``offer_previews``); decoding and encoding run on another thread (``PreviewSink``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Protocol

from PIL import Image

#: A preview's longest side, in pixels.
PREVIEW_SIDE = 256
PREVIEW_MEDIA_TYPE = "image/jpeg"
# JPEG at 80: a 256x256 preview is ~10 KB, small enough to inline in an SSE event.
JPEG_QUALITY = 80
#: SD's VAE: one latent pixel is 8x8 image pixels.
LATENT_SCALE = 8

#: SD 1.x latent channel -> (R, G, B) contributions (rows: the 4 latent channels), on the
#: scaled latents the sampler steps; the result is roughly in [-1, 1].
SD15_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.0268, -0.0760),
)


class PreviewDecoder(Protocol):
    """Turns one image's latents (``(C, h, w)``, a CPU tensor) into pixels."""

    def decode(self, latents: Any) -> Image.Image: ...


class PreviewSink(Protocol):
    """One job's previews, as the pipeline's step callback sees them."""

    def due(self) -> bool:
        """A preview would be published now (the interval passed, none in flight)."""
        ...

    def offer(self, step: int, total: int, latents: Any) -> None:
        """Take ``latents`` (a CPU copy the sink owns) and return at once."""
        ...


def _to_image(rgb: Any) -> Image.Image:
    """``(3, h, w)`` in [-1, 1] -> an RGB image."""
    import torch

    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), "RGB")


class LinearDecoder:
    """The fixed 4x3 SD 1.x latent-to-RGB map (other channel counts: their first 4)."""

    def decode(self, latents: Any) -> Image.Image:
        import torch

        factors = torch.tensor(SD15_LATENT_RGB, dtype=torch.float32)
        channels = latents[: factors.shape[0]].to(torch.float32)
        rgb = torch.einsum("chw,cr->rhw", channels, factors[: channels.shape[0]])
        return _to_image(rgb)


class TinyDecoder:
    """A diffusers ``AutoencoderTiny`` (TAESD) loaded from a local directory, on the CPU.

    Shared by a worker's jobs, one decode at a time: two at once would only share the
    same CPU cores, and the pipeline's thread needs them too.
    """

    def __init__(self, path: str) -> None:
        import torch
        from diffusers import AutoencoderTiny

        self.model = AutoencoderTiny.from_pretrained(path, torch_dtype=torch.float32).eval()
        self._lock = threading.Lock()

    def decode(self, latents: Any) -> Image.Image:
        import torch

        with self._lock, torch.inference_mode():
            out = self.model.decode(latents.to(torch.float32).unsqueeze(0)).sample[0]
        return _to_image(out)


def open_decoder(path: str) -> PreviewDecoder:
    """The tiny autoencoder in ``path``; the linear map when ``path`` is empty."""
    return TinyDecoder(path) if path else LinearDecoder()


def preview_jpeg(image: Image.Image, latent_size: tuple[int, int]) -> bytes:
    """``image`` as a JPEG whose long side is at most ``PREVIEW_SIDE`` and at most the
    output's (a linear preview, at latent size, is scaled up to it: 64 -> 256 for 512)."""
    width, height = (side * LATENT_SCALE for side in latent_size)
    scale = min(1.0, PREVIEW_SIDE / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    buffer = BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def offer_previews(
    latents: Any,
    counts: Sequence[int],
    sinks: Sequence[PreviewSink | None],
    step: int,
    total: int,
) -> None:
    """Hand each job of a call whose preview is due its first image's latents.

    ``latents`` is the call's ``(images, C, h, w)`` batch, jobs in order, ``counts[i]``
    images each. The copy is one small tensor (64 KB for a 512x512 image): a job's
    preview costs the pipeline's thread a device-to-host copy, nothing else.
    """
    import torch

    start = 0
    for count, sink in zip(counts, sinks, strict=True):
        if sink is not None and sink.due():
            one = latents[start].detach().to("cpu", torch.float32, copy=True)
            sink.offer(step, total, one)
        start += count


@dataclass(frozen=True)
class CallPreviews:
    """A call's preview sinks, one per job, and each job's image count (its slice)."""

    counts: list[int]
    sinks: Sequence[PreviewSink | None]

    @property
    def wanted(self) -> bool:
        return any(sink is not None for sink in self.sinks)
