"""Cross-attention heatmaps for captions: where the text decoder looked for each token.

The payload (JSON-able, stored beside a caption job's outputs)::

    {"grid": [h, w], "frame": {"resize": "stretch", "box": [0, 0, w, h]}, "text": "...",
     "tokens": [{"token": "dog", "mean": [[...] * w] * h, "layers": [[[...]]] * n_layers}]}

``grid`` is the vision patch grid, ``image_size // patch_size`` from the vision config
(24x24 for BLIP-base at 384 px). For each generated token, ``layers[l]`` is the
cross-attention of decoder layer ``l`` over the image patches, averaged over heads, and
``mean`` averages those over layers. The CLS patch is dropped and every grid is then
**normalised to sum to 1** (a distribution over patches), so grids compare across tokens
and layers. The overlay stretches each panel between its own minimum and maximum, for
display only. ``frame`` places the original image on the grid, in cells
(``imageq.workers.predictors.framing``): a center-cropped image reaches past the grid, and a
letterboxed one keeps only the rows and columns that show it (normalised again).
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from imageq.workers.predictors.framing import Frame, Resize

if TYPE_CHECKING:
    import torch

# Six decimals keep each of BLIP-base's 576 cells exact to ~1e-6 and the JSON a third
# of the size of full float reprs.
DECIMALS = 6


def patch_grid(vision_config: Any) -> tuple[int, int]:
    """(rows, columns) of the ViT patch grid, from ``image_size`` and ``patch_size``."""

    def pair(value: Any) -> tuple[int, int]:
        if isinstance(value, list | tuple):
            return int(value[0]), int(value[1])
        return int(value), int(value)

    (height, width), (patch_h, patch_w) = (
        pair(vision_config.image_size),
        pair(vision_config.patch_size),
    )
    return height // patch_h, width // patch_w


def _normalised(weights: torch.Tensor) -> torch.Tensor:
    # Clamping guards the division when every weight underflowed to zero (fp16).
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def summarise_cross_attention(
    cross_attentions: Sequence[torch.Tensor], grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-averaged, CLS-free, sum-1 attention per layer and its mean over layers.

    ``cross_attentions`` holds one ``(batch, heads, query_len, 1 + patches)`` tensor per
    decoder layer. Returns ``layers`` of shape ``(batch, n_layers, query_len, patches)``
    and ``mean`` of shape ``(batch, query_len, patches)``, both in float32.
    """
    import torch

    stacked = torch.stack([layer.float() for layer in cross_attentions], dim=1)
    patches = stacked.shape[-1] - 1
    if patches != grid[0] * grid[1]:
        raise ValueError(
            f"cross-attention covers {patches} patches, but the vision config gives a "
            f"{grid[0]}x{grid[1]} grid"
        )
    per_layer = _normalised(stacked.mean(dim=2)[..., 1:])
    return per_layer, _normalised(per_layer.mean(dim=1))


def _cells(frame: Frame | None, grid: tuple[int, int]) -> tuple[float, float, float, float]:
    """The frame's box in grid cells: (left, top, right, bottom)."""
    rows, cols = grid
    x0, y0, x1, y1 = frame.box if frame is not None else (0.0, 0.0, 1.0, 1.0)
    return x0 * cols, y0 * rows, x1 * cols, y1 * rows


def _image_cells(
    box: tuple[float, float, float, float], grid: tuple[int, int]
) -> tuple[slice, slice]:
    """The rows and columns of the grid that show some of the image (letterbox padding
    fills the others). Rounding noise (1e-6 of a cell) never adds a row."""
    rows, cols = grid
    x0, y0, x1, y1 = box
    top, bottom = max(0, math.floor(y0 + 1e-6)), min(rows, math.ceil(y1 - 1e-6))
    left, right = max(0, math.floor(x0 + 1e-6)), min(cols, math.ceil(x1 - 1e-6))
    return slice(top, max(bottom, top + 1)), slice(left, max(right, left + 1))


def attention_payload(
    layers: torch.Tensor,
    mean: torch.Tensor,
    tokens: Sequence[str],
    grid: tuple[int, int],
    text: str,
    frame: Frame | None = None,
) -> dict[str, Any]:
    """The JSON payload for one caption.

    ``layers`` is ``(n_layers, n_tokens, patches)`` and ``mean`` ``(n_tokens, patches)``,
    already restricted to the rows that produced ``tokens``. ``frame``: where the image
    lies on the input (``imageq.workers.predictors.framing``); a letterboxed image's grids keep
    only the rows and columns that show some of it, normalised again to sum to 1.
    """
    rows, cols = grid
    n = len(tokens)
    layer_grids = layers.reshape(layers.shape[0], n, rows, cols)
    mean_grids = mean.reshape(n, rows, cols)
    box = _cells(frame, grid)
    if frame is not None and frame.resize is Resize.LETTERBOX:
        keep_rows, keep_cols = _image_cells(box, grid)
        layer_grids = _renormalised(layer_grids[..., keep_rows, keep_cols])
        mean_grids = _renormalised(mean_grids[..., keep_rows, keep_cols])
        rows, cols = mean_grids.shape[-2:]
        top, left = keep_rows.start, keep_cols.start
        box = (box[0] - left, box[1] - top, box[2] - left, box[3] - top)
    layer_grids = layer_grids.round(decimals=DECIMALS)
    mean_grids = mean_grids.round(decimals=DECIMALS)
    entries = [
        {
            "token": token,
            "mean": mean_grids[i].tolist(),
            "layers": layer_grids[:, i].tolist(),
        }
        for i, token in enumerate(tokens)
    ]
    resize = frame.resize.value if frame is not None else "stretch"
    return {
        "grid": [int(rows), int(cols)],
        "frame": {"resize": resize, "box": [round(v, DECIMALS) for v in box]},
        "text": text,
        "tokens": entries,
    }


def _renormalised(grids: torch.Tensor) -> torch.Tensor:
    flat = grids.flatten(start_dim=-2)
    return _normalised(flat).reshape(grids.shape)


def peak_cell(grid: list[list[float]]) -> list[int]:
    """[row, column] of the grid's largest cell (the first one on a tie)."""
    cells = [(r, c) for r, row in enumerate(grid) for c in range(len(row))]
    row, col = max(cells, key=lambda rc: grid[rc[0]][rc[1]])
    return [row, col]


# The photo under the heat is desaturated and dimmed, so that colour on a panel always
# means attention and never the photo's own reds and yellows.
_BACKDROP_COLOUR = 0.0
_BACKDROP_BRIGHTNESS = 0.85
# A dark purple -> crimson -> orange -> yellow ramp (after matplotlib's "inferno"):
# brighter means more attention, readable without a legend.
_RAMP = ((0.0, (40, 10, 90)), (0.4, (190, 30, 60)), (0.7, (250, 120, 20)), (1.0, (255, 240, 80)))
# Panels stay at the input image's size up to this longer side (BLIP itself sees
# 384 px); a 6000 px photo would otherwise make a sheet of gigapixels.
OVERLAY_MAX_SIDE = 1024
# The whole sheet's pixel budget: eight 1024 x 768 panels fit; a longer caption over a
# large photo shrinks its panels rather than grow the PNG (zlib encoding dominates the
# cost, several seconds per 10 Mpx of a detailed photo on one core).
OVERLAY_MAX_PIXELS = 8_000_000


def _ramp_lut() -> list[int]:
    channels: list[list[int]] = [[], [], []]
    for value in range(256):
        x = value / 255
        for (x0, c0), (x1, c1) in itertools.pairwise(_RAMP):
            if x <= x1:
                t = (x - x0) / (x1 - x0)
                for channel in range(3):
                    channels[channel].append(round(c0[channel] + t * (c1[channel] - c0[channel])))
                break
    return channels[0] + channels[1] + channels[2]


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ValueError):
        # A Pillow without FreeType only has the small bitmap font.
        return ImageFont.load_default()


def _heat(
    grid: list[list[float]],
    size: tuple[int, int],
    box: Sequence[float] | None = None,
) -> Image.Image:
    """The grid stretched to 0..255 between its own min and max, upsampled to ``size``.

    ``box``: where the image lies in grid cells (the payload's ``frame``); a cropped
    image reaches past the grid, and that part of it gets no heat.
    """
    values = [v for row in grid for v in row]
    low, high = min(values), max(values)
    scale = 255.0 / (high - low) if high > low else 0.0
    cells = bytes(min(255, round((v - low) * scale)) for v in values)
    small = Image.frombytes("L", (len(grid[0]), len(grid)), cells)
    full = (0.0, 0.0, float(small.width), float(small.height))
    if box is None or all(abs(a - b) < 1e-6 for a, b in zip(box, full, strict=True)):
        return small.resize(size, Image.Resampling.BILINEAR)
    left, top, right, bottom = (float(v) for v in box)
    return small.transform(
        size, Image.Transform.EXTENT, (left, top, right, bottom), Image.Resampling.BILINEAR
    )


def _backdrop(base: Image.Image) -> Image.Image:
    muted = ImageEnhance.Color(base).enhance(_BACKDROP_COLOUR)
    return ImageEnhance.Brightness(muted).enhance(_BACKDROP_BRIGHTNESS)


def _panel(
    backdrop: Image.Image,
    grid: list[list[float]],
    label: str,
    opacity: int,
    lut: list[int],
    box: Sequence[float] | None = None,
) -> Image.Image:
    heat = _heat(grid, backdrop.size, box)
    colour = heat.convert("RGB").point(lut)
    # Opacity grows with attention: ignored patches show the photo, the peak is covered
    # to ``opacity`` (0-255).
    mask = heat.point(lambda v: round(opacity * (v / 255) ** 1.5))
    panel = Image.composite(colour, backdrop, mask)
    draw = ImageDraw.Draw(panel, "RGBA")
    width, height = panel.size
    if min(width, height) >= 32:
        # A hairline on the right and bottom edges separates neighbouring panels.
        draw.line((width - 1, 0, width - 1, height - 1), fill=(0, 0, 0, 255))
        draw.line((0, height - 1, width - 1, height - 1), fill=(0, 0, 0, 255))
    size = max(10, min(height // 8, width // 5, 48))
    font = _font(size)
    pad = max(2, size // 4)
    box = draw.textbbox((pad, pad), label, font=font)
    draw.rectangle((0, 0, box[2] + pad, box[3] + pad), fill=(0, 0, 0, 190))
    draw.text((pad, pad), label, fill=(255, 255, 255, 255), font=font)
    return panel


def panel_size(
    image_size: tuple[int, int],
    n_panels: int,
    *,
    columns: int = 4,
    max_height: int | None = None,
    max_side: int | None = None,
    max_pixels: int | None = None,
) -> tuple[int, int]:
    """(width, height) of each panel: the input's size unless a limit asks for less.

    The aspect ratio is kept; every limit only ever scales down.
    """
    width, height = image_size
    scale = 1.0
    if max_height is not None and height > max_height:
        scale = min(scale, max_height / height)
    if max_side is not None and max(width, height) > max_side:
        scale = min(scale, max_side / max(width, height))
    if max_pixels is not None:
        n = max(1, n_panels)
        cols = max(1, min(columns, n))
        sheet = cols * -(-n // cols) * width * height
        if sheet * scale * scale > max_pixels:
            scale = min(scale, (max_pixels / sheet) ** 0.5)
    if scale >= 1.0:
        return width, height
    # Round down (never past a limit), forgiving float error: 144 * (20 / 144) is 20.
    return max(1, int(width * scale + 1e-6)), max(1, int(height * scale + 1e-6))


def overlay_png(
    image: Image.Image,
    payload: dict[str, Any],
    *,
    columns: int = 4,
    alpha: float = 0.75,
    max_height: int | None = None,
    max_side: int | None = None,
    max_pixels: int | None = None,
) -> bytes:
    """A PNG with one heatmap panel per generated token over the original image.

    Each panel is the input image at its own size (scaled down, aspect kept, only as far
    as ``max_height``, ``max_side`` and the sheet's ``max_pixels`` require; see
    ``panel_size``), muted to grey, with that token's mean grid upsampled over it in
    colour (opacity up to ``alpha`` at the panel's peak) and the token written in its
    top-left corner. Panels fill rows of ``columns``, left to right then top to bottom,
    so the PNG is ``min(n, columns)`` panels wide and ``ceil(n / columns)`` panels high.
    A caption with no tokens gives one unmarked panel of the image itself. The payload's
    ``frame`` places the grid on the image: over the centre crop only for
    ``center_crop``, over the image alone (never the padding) for ``letterbox``.
    """
    base = image.convert("RGB")
    entries = payload.get("tokens") or []
    size = panel_size(
        base.size,
        len(entries),
        columns=columns,
        max_height=max_height,
        max_side=max_side,
        max_pixels=max_pixels,
    )
    if size != base.size:
        base = base.resize(size, Image.Resampling.BILINEAR)
    lut = _ramp_lut()
    backdrop = _backdrop(base)
    opacity = round(255 * min(1.0, max(0.0, alpha)))
    box = (payload.get("frame") or {}).get("box")
    panels = [_panel(backdrop, e["mean"], str(e["token"]), opacity, lut, box) for e in entries]
    panels = panels or [base]
    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    sheet = Image.new("RGB", (columns * base.width, rows * base.height), (0, 0, 0))
    for i, panel in enumerate(panels):
        sheet.paste(panel, ((i % columns) * base.width, (i // columns) * base.height))
    out = io.BytesIO()
    sheet.save(out, format="PNG", optimize=False)
    return out.getvalue()
