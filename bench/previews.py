"""What step previews cost: pipeline steps/s with previews on against off, and one preview.

One warm ``DiffusionPredictor`` (the tiny random SD checkpoint on CPU by default, or
``--model DIR`` on ``--device``) runs the same generate job with previews off and on,
interleaved ``--runs`` times so drift hits both alike; "on" is the production path: a
``PreviewPublisher`` at IMAGEQ_PREVIEW_INTERVAL_MS (500 by default) whose previews are
decoded, JPEG-encoded and written to a local folder on the worker's preview threads.
Then the cost of one preview off the pipeline's thread (decode + JPEG) with the linear
decoder and with a tiny random ``AutoencoderTiny`` (TAESD's architecture; its cost
depends on the architecture's widths, so ``--taesd DIR`` names a real one to measure).

    python bench/previews.py [--steps 100] [--size 256] [--runs 3] [--interval-ms 500]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# ``python bench/previews.py`` from a fresh clone: ``bench`` is not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imageq.api_client.inputs import GenerateInput
from imageq.api_client.settings import Settings
from imageq.workers.kinds.diffusion_previews import PreviewPublisher
from imageq.workers.predictors.diffusion import DiffusionPredictor, GenerateJob
from imageq.workers.predictors.previews import (
    LinearDecoder,
    PreviewDecoder,
    TinyDecoder,
    preview_jpeg,
)
from imageq.workers.testing.tiny_diffusion import build_tiny_diffusion, build_tiny_taesd


def noop(step: int, total: int, info: dict[str, Any]) -> None:
    return None


class TimedSink:
    """The publisher, with the time the pipeline's thread spends in it: ``due`` every
    step, ``offer`` per preview. The latents' slice and copy, made just before ``offer``,
    are not in it: microseconds on a CPU; on a GPU the copy also waits for the step's
    kernels, once a preview (every 500 ms)."""

    def __init__(self, publisher: PreviewPublisher) -> None:
        self.publisher = publisher
        self.spent_s = 0.0

    def due(self) -> bool:
        started = time.perf_counter()
        try:
            return self.publisher.due()
        finally:
            self.spent_s += time.perf_counter() - started

    def offer(self, step: int, total: int, latents: Any) -> None:
        started = time.perf_counter()
        self.publisher.offer(step, total, latents)
        self.spent_s += time.perf_counter() - started


def timed_run(
    predictor: DiffusionPredictor, inp: GenerateInput, sink: TimedSink | None
) -> tuple[float, float]:
    """(steps per second, seconds) of one job: its pipeline call and the wait for its
    last preview."""
    steps: list[int] = []

    def on_step(step: int, total: int, info: dict[str, Any]) -> None:
        steps.append(total)

    started = time.perf_counter()
    predictor.predict([GenerateJob(inp, on_step, sink)])
    if sink is not None:
        sink.publisher.close()
    elapsed = time.perf_counter() - started
    return len(steps) / elapsed, elapsed


def preview_cost(decoder: PreviewDecoder, latent_side: int, repeat: int = 20) -> float:
    """Milliseconds for one preview off the pipeline thread: decode and JPEG."""
    import torch

    latents = torch.randn(4, latent_side, latent_side)
    preview_jpeg(decoder.decode(latents), (latent_side, latent_side))  # warm
    started = time.perf_counter()
    for _ in range(repeat):
        preview_jpeg(decoder.decode(latents), (latent_side, latent_side))
    return (time.perf_counter() - started) / repeat * 1000


def run(args: argparse.Namespace) -> None:
    import torch

    if args.device == "cpu":
        torch.set_num_threads(1)  # as a worker runs (OMP_NUM_THREADS=1)
    tmp = Path(tempfile.mkdtemp(prefix="imageq-previews-bench-"))
    model = Path(args.model) if args.model else build_tiny_diffusion(tmp / "tiny-sd")
    taesd = Path(args.taesd) if args.taesd else build_tiny_taesd(tmp / "tiny-taesd")
    predictor = DiffusionPredictor(str(model), settings=Settings())
    predictor.setup(args.device)
    inp = GenerateInput(
        prompt="a lighthouse at dusk", width=args.size, height=args.size, steps=args.steps, seed=3
    )
    out = tmp / "preview.jpg"
    published: list[dict[str, Any]] = []

    def store(data: bytes) -> dict[str, Any]:
        out.write_bytes(data)
        return {"uri": out.as_uri()}

    timed_run(predictor, inp, None)  # warm up
    ratios, off_rates, on_rates, counts, spent, shares = [], [], [], [], [], []
    with ThreadPoolExecutor(2, thread_name_prefix="imageq-preview") as pool:
        for run_index in range(args.runs):
            publisher = PreviewPublisher(
                LinearDecoder(), pool, store, published.append, args.interval_ms / 1000
            )
            sink = TimedSink(publisher)
            # Alternate which goes first, so that load that comes and goes hits both.
            if run_index % 2:
                on, on_s = timed_run(predictor, inp, sink)
                off, _ = timed_run(predictor, inp, None)
            else:
                off, _ = timed_run(predictor, inp, None)
                on, on_s = timed_run(predictor, inp, sink)
            off_rates.append(off)
            on_rates.append(on)
            ratios.append(on / off)
            counts.append(publisher.published)
            spent.append(sink.spent_s / max(1, publisher.published))
            # The load-independent figure: the pipeline thread's own time in previews,
            # as a share of the run.
            shares.append(sink.spent_s / on_s)
    print(f"model={model} device={predictor.device} size={args.size} steps={args.steps}")
    print(
        f"steps/s previews off: {statistics.median(off_rates):.2f}  "
        f"on (linear, every {args.interval_ms} ms): {statistics.median(on_rates):.2f}  "
        f"ratio on/off: {statistics.median(ratios):.3f} "
        f"(runs: {', '.join(f'{r:.3f}' for r in ratios)}; previews a run: {counts})"
    )
    print(
        f"best of {args.runs}: off {max(off_rates):.2f}, on {max(on_rates):.2f} steps/s, "
        f"ratio {max(on_rates) / max(off_rates):.3f}; the pipeline thread's hand-off: "
        f"{statistics.median(spent) * 1000:.3f} ms a preview (due checks included), "
        f"{statistics.median(shares) * 100:.2f}% of the run: steps/s x "
        f"{1 - statistics.median(shares):.4f} from the hand-off alone"
    )
    side = args.size // 8
    linear_ms = preview_cost(LinearDecoder(), side)
    tiny_ms = preview_cost(TinyDecoder(str(taesd)), side)
    print(
        f"one preview ({side}x{side} latents -> JPEG, on a preview thread): "
        f"linear {linear_ms:.1f} ms, tiny autoencoder {tiny_ms:.1f} ms ({taesd})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--interval-ms", type=int, default=Settings().preview_interval_ms)
    parser.add_argument("--model", help="a local SD 1.x pipeline (default: the tiny one)")
    parser.add_argument("--taesd", help="a local AutoencoderTiny (default: a tiny random one)")
    parser.add_argument("--device", default="cpu")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
