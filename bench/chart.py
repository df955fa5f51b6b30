"""A PNG bar chart of benchmark results, drawn with PIL alone (no matplotlib to install).

    from bench.chart import bar_chart
    bar_chart("overhead.png", "p50 latency", {"bare": {"ms": 46.4}, "imageq": {"ms": 50.6}})

Each category (a row) has one bar per series; bars are horizontal so long labels fit.
From the shell: ``python bench/chart.py results.json out.png --title "..." --unit ms``
with ``{"category": {"series": value}}`` (or ``{"category": value}``) in the JSON file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

# Colour-blind-safe (Okabe-Ito), one per series in order.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442")
Results = Mapping[str, Mapping[str, float]] | Mapping[str, float]


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def normalise(results: Results) -> dict[str, dict[str, float]]:
    """``{category: value}`` becomes ``{category: {"": value}}``; bars start at zero."""
    out: dict[str, dict[str, float]] = {}
    for category, value in results.items():
        series = value if isinstance(value, Mapping) else {"": value}
        row = {}
        for name, number in series.items():
            if isinstance(number, bool) or not isinstance(number, int | float):
                raise ValueError(f"{category}/{name}: {number!r} is not a number")
            if number != number or number in (float("inf"), float("-inf")) or number < 0:
                raise ValueError(f"{category}/{name}: {number!r} is not a finite value >= 0")
            row[str(name)] = float(number)
        out[str(category)] = row
    if not out:
        raise ValueError("no results to chart")
    return out


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def bar_chart(
    path: str | Path,
    title: str,
    results: Results,
    *,
    unit: str = "",
    width_px: int = 900,
    bar_px: int = 22,
) -> Path:
    """Write the chart to ``path`` (PNG) and return it."""
    rows = normalise(results)
    series = list(dict.fromkeys(name for row in rows.values() for name in row))
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(series)}
    font, small, bold = _font(15), _font(13), _font(18)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_w(text: str, f: Any) -> int:
        return int(probe.textlength(text, font=f))

    pad, gap = 16, 10
    label_w = max(text_w(c, font) for c in rows) + pad
    value_w = max(text_w(_fmt(v) + " " + unit, small) for r in rows.values() for v in r.values())
    legend_h = 26 if any(series) else 0
    top = pad + 30 + legend_h
    height = top + sum(len(r) * bar_px + gap for r in rows.values()) + pad
    image = Image.new("RGB", (width_px, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((pad, pad), title, fill="black", font=bold)
    x = pad
    for name in series:
        if not name:
            continue
        draw.rectangle((x, pad + 32, x + 14, pad + 46), fill=colours[name])
        draw.text((x + 20, pad + 31), name, fill="black", font=small)
        x += 20 + text_w(name, small) + 24
    left = pad + label_w
    span = max(1, width_px - left - value_w - 2 * pad)
    peak = max(v for r in rows.values() for v in r.values()) or 1.0
    y = top
    for category, row in rows.items():
        block = len(row) * bar_px
        draw.text((pad, y + block / 2 - 9), category, fill="black", font=font)
        for name, value in row.items():
            length = int(span * value / peak)
            draw.rectangle((left, y + 2, left + max(1, length), y + bar_px - 3), fill=colours[name])
            draw.text(
                (left + length + 6, y + 3),
                f"{_fmt(value)} {unit}".rstrip(),
                fill="black",
                font=small,
            )
            y += bar_px
        y += gap
    draw.line((left, top - 4, left, y - gap + 2), fill="#444444")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bar chart of benchmark results (PNG)")
    parser.add_argument("results", help='JSON: {"category": {"series": value}} or {"category": v}')
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("--title", default="benchmark")
    parser.add_argument("--unit", default="")
    args = parser.parse_args(argv)
    try:
        results = json.loads(Path(args.results).read_text())
        path = bar_chart(args.out, args.title, results, unit=args.unit)
    except (OSError, ValueError) as exc:
        print(f"chart: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
