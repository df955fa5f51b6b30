"""One JSON and one Markdown table from the figures ``bench/gpu.sh`` collects.

Reads whichever of these the run wrote into DIR (a step that failed or ran out of time
leaves its file out, and its rows say so): ``dispatch.json`` (bench/dispatch.py),
``caption-1.json`` / ``caption-64.json`` (``bench.batching``, single-image and 64-image
jobs), ``diffusion.json`` (bench/gpu_diffusion.py), ``lora.json`` (bench/gpu_finetune.py).
Writes ``gpu-bench.json`` (all of them, and the verdicts) and ``gpu-bench.md``.

    python bench/gpu_report.py DIR [--title "H100 80GB, driver 550"]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

#: Per H100-class GPU (docs/performance.md).
CAPTION_JOBS_PER_S = 1000.0
SD15_IMAGES_PER_S = 7.0


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _f(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def caption_rows(rows: list[dict[str, Any]] | None, per_job: int) -> list[list[str]]:
    out = []
    for r in rows or []:
        ratio = r["queue"] / r["bare"] if r.get("bare") else None
        sizes = r.get("sizes") or [0]
        out.append(
            [
                f"BLIP-base caption, {per_job}-image jobs",
                r["dtype"],
                str(r["batch"]),
                _f(r["queue"]),
                _f(r["bare"]),
                _f(ratio, 2) + "x" if ratio else "-",
                f"mean pass {sum(sizes) / len(sizes):.0f}",
            ]
        )
    return out


def build(folder: Path) -> tuple[dict[str, Any], list[str]]:
    found = {
        name: _load(folder / f"{name}.json")
        for name in ("dispatch", "caption-1", "caption-64", "diffusion", "lora")
    }
    table = [["benchmark", "dtype", "batch", "imageq", "bare", "imageq/bare", "notes"]]
    table += caption_rows(found["caption-1"], 1)
    table += caption_rows(found["caption-64"], 64)
    dispatch = found["dispatch"]
    if dispatch:
        single = dispatch["single"]
        table.append(
            [
                "tiny caption, dispatch (1 process)",
                "-",
                "-",
                _f(single["jobs_per_s"]),
                "-",
                "-",
                f"bookkeeping {dispatch['bookkeeping_ms']:.2f} ms CPU/job",
            ]
        )
        several = dispatch.get("processes")
        if several:
            table.append(
                [
                    "tiny caption, dispatch (" + several["label"].rsplit(", ", 1)[-1] + ")",
                    "-",
                    "-",
                    _f(several["jobs_per_s"]),
                    "-",
                    "-",
                    "jobs/s",
                ]
            )
    diffusion = found["diffusion"]
    if diffusion:
        for batch, bare in diffusion["bare"].items():
            queued = diffusion["imageq"].get(batch)
            compiled = (diffusion.get("bare_compiled") or {}).get(batch)
            table.append(
                [
                    f"SD 1.5 {diffusion['size']}², {diffusion['steps']} steps",
                    diffusion["dtype"],
                    str(batch),
                    _f(queued, 2),
                    _f(bare, 2),
                    _f(queued / bare, 2) + "x" if queued else "-",
                    f"bare compiled {_f(compiled, 2)}" if compiled else "",
                ]
            )
    lora = found["lora"]
    if lora:
        table.append(
            [
                "LoRA on the SD 1.5 UNet",
                str(lora.get("dtype", "-")),
                str(lora.get("batch", "-")),
                _f(lora.get("loop_steps_per_s"), 2),
                _f(lora.get("bare_steps_per_s"), 2),
                "-",
                "steps/s",
            ]
        )
    verdicts = _verdicts(found)
    lines = ["| " + " | ".join(row) + " |" for row in table]
    lines.insert(1, "|" + "---|" * len(table[0]))
    lines += ["", *[f"- {v}" for v in verdicts]]
    missing = [name for name, value in found.items() if value is None]
    if missing:
        lines.append(f"- not measured (step failed or ran out of time): {', '.join(missing)}")
    return {"figures": found, "verdicts": verdicts}, lines


def _verdicts(found: dict[str, Any]) -> list[str]:
    out = []
    rows = found["caption-1"] or []
    if rows:
        best = max(rows, key=lambda r: r["queue"])
        ok = best["queue"] >= CAPTION_JOBS_PER_S
        out.append(
            f"single-image caption jobs: {best['queue']:.0f} jobs/s through one worker process "
            f"({best['dtype']}, batch {best['batch']}) [target >= {CAPTION_JOBS_PER_S:.0f}: "
            f"{'ok' if ok else 'MISSED'}]"
        )
    diffusion = found["diffusion"]
    if diffusion:
        best_sd = max(diffusion["imageq"].values())
        ok = best_sd >= SD15_IMAGES_PER_S
        out.append(
            f"SD 1.5 through imageq: {best_sd:.2f} images/s [target >= {SD15_IMAGES_PER_S:.0f}: "
            f"{'ok' if ok else 'MISSED'}]"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    figures, lines = build(args.folder)
    figures["title"] = args.title
    (args.folder / "gpu-bench.json").write_text(json.dumps(figures, indent=2))
    text = "\n".join(([f"**{args.title}**", ""] if args.title else []) + lines) + "\n"
    (args.folder / "gpu-bench.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
