"""SD 1.5 images/s on a GPU: the bare diffusers pipeline against jobs through imageq.

Full-size SD 1.5 architecture with random weights (the cost of a forward pass depends on
the architecture, not on the weights; nothing is downloaded), 512x512, 25 steps. For
each batch size it prints images/s of a bare ``StableDiffusionPipeline`` call of that
many images, and of generate jobs of that many images through Redis and a real
diffusion worker (``imageq worker diffusion --device cuda``), run one after another;
then the rate of single-image jobs submitted together, which the worker batches.

    python bench/gpu_diffusion.py --batch 1,4,8 --dtype fp16       # called by bench/gpu.sh
    python bench/gpu_diffusion.py --tiny                            # a CPU check of this script

``--compile`` also measures the bare pipeline with its UNet under ``torch.compile``
(one dynamic-shape graph for every batch size, compiled during the warm-up calls);
``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from imageq.api_client.client import Client
from imageq.api_client.records import connect
from imageq.api_client.settings import Settings, process_environment
from imageq.workers.testing.services import RedisServer, WorkerProcess
from imageq.workers.testing.tiny_diffusion import build_sd15_random, build_tiny_diffusion

PROMPT = "a photograph of an astronaut riding a horse"


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def bare_rates(
    model: Path,
    device: str,
    fp16: bool,
    batches: list[int],
    size: int,
    steps: int,
    repeats: int,
    compiled: bool = False,
) -> dict[int, float]:
    import torch
    from diffusers import StableDiffusionPipeline

    dtype = torch.float16 if fp16 else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(
        str(model), dtype=dtype, use_safetensors=True, safety_checker=None
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    if compiled:
        # One graph for every batch size: a static one per size would compile three times.
        pipe.unet = torch.compile(pipe.unet, dynamic=True)

    def call(batch: int, seed: int) -> None:
        generators = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
        pipe(
            prompt=[PROMPT] * batch,
            num_inference_steps=steps,
            height=size,
            width=size,
            generator=generators,
        )

    rates = {}
    for batch in batches:
        call(batch, 0)  # warm-up: kernel selection, allocator growth
        sync(device)
        began = time.perf_counter()
        for r in range(repeats):
            call(batch, 100 * r)
        sync(device)
        rates[batch] = batch * repeats / (time.perf_counter() - began)
    return rates


def release(device: str) -> None:
    """Give the bare pipeline's GPU memory back: the worker process needs it next."""
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def queue_rates(
    model: Path,
    device: str,
    fp16: bool,
    batches: list[int],
    size: int,
    steps: int,
    repeats: int,
    tmp: Path,
) -> tuple[dict[int, float], float, float]:
    redis_server = RedisServer(tmp / "redis", appendonly=False).start()
    top = max(batches)
    env = process_environment()
    env.update(
        IMAGEQ_BROKER_URL=redis_server.url,
        IMAGEQ_MODEL_DIFFUSION=str(model),
        IMAGEQ_STORAGE_URL=f"file://{tmp / 'storage'}",
        IMAGEQ_QUEUE_PREFIX="gpu-bench-",
        IMAGEQ_HALF_PRECISION="1" if fp16 else "0",
        IMAGEQ_MAX_DIFFUSION_BATCH_IMAGES=str(top),
        IMAGEQ_DIFFUSION_CONCURRENCY=str(top),
        IMAGEQ_MAX_OUTPUT_PIXELS=str(max(size * size, 1024 * 1024)),
    )
    settings = Settings.from_env(env)
    client = Client(settings)
    name = "diffusion@gpu-bench"
    # The last --device wins over the CPU default WorkerProcess passes.
    worker = WorkerProcess("diffusion", env, name, tmp / "worker.log", "--device", device)
    worker.start()
    fields: dict[str, Any] = {"width": size, "height": size, "steps": steps}
    try:
        worker.wait_ready(connect(redis_server.url), client.store.keys.worker(name), 900)

        def job(batch: int, seed: int) -> None:
            record = client.wait(
                client.generate(PROMPT, seed=seed, num_images=batch, **fields).id, 900
            )
            assert record.status == "succeeded", record.error

        rates = {}
        for batch in batches:
            job(batch, 0)
            began = time.perf_counter()
            for r in range(repeats):
                job(batch, 100 * r)
            rates[batch] = batch * repeats / (time.perf_counter() - began)
        # Single-image jobs submitted together: the worker batches those that wait.
        count = top * repeats
        began = time.perf_counter()
        ids = [client.generate(PROMPT, seed=s, **fields).id for s in range(count)]
        records = [client.wait(job_id, 1800) for job_id in ids]
        burst = count / (time.perf_counter() - began)
        assert all(r.status == "succeeded" for r in records), [r.error for r in records]
        mean_jobs = statistics.mean(r.metrics["batch_jobs"] for r in records)
        return rates, burst, mean_jobs
    finally:
        client.close()
        worker.stop(120)
        redis_server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--batch", default="1,4,8", help="images per pipeline call, e.g. 1,4,8")
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny model on CPU (64x64): checks this script"
    )
    parser.add_argument("--compile", action="store_true", help="also: bare, UNet compiled")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    if not batches or min(batches) < 1 or max(batches) > 8:
        parser.error("--batch: sizes from 1 to 8 (a job holds at most 8 images)")
    device, size, fp16 = args.device, args.size, args.dtype == "fp16"
    tmp = Path(tempfile.mkdtemp(prefix="imageq-gpu-bench-"))
    if args.tiny:
        device, size, fp16 = "cpu", 64, False  # fp16 convolutions are not a CPU thing
        model = build_tiny_diffusion(tmp / "model")
        label = "tiny SD"
    else:
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            parser.error("no CUDA device here: use --tiny for a CPU check")
        model = build_sd15_random(tmp / "model")
        label = "SD 1.5 (random weights)"
    bare = bare_rates(model, device, fp16, batches, size, args.steps, args.repeats)
    release(device)
    compiled: dict[int, float] = {}
    if args.compile:
        compiled = bare_rates(model, device, fp16, batches, size, args.steps, args.repeats, True)
        release(device)
    queued, burst, mean_jobs = queue_rates(
        model, device, fp16, batches, size, args.steps, args.repeats, tmp
    )
    dtype = "fp16" if fp16 else "fp32"
    print(f"\n{label}, {size}x{size}, {args.steps} steps, {dtype}, {device}")
    print(f"{'batch':>6}{'bare img/s':>12}{'imageq img/s':>14}{'imageq/bare':>13}{'compiled':>10}")
    for batch in batches:
        done = f"{compiled[batch]:10.2f}" if compiled else f"{'-':>10}"
        print(
            f"{batch:6d}{bare[batch]:12.2f}{queued[batch]:14.2f}"
            f"{queued[batch] / bare[batch]:13.2f}{done}"
        )
    top = max(batches)
    print(
        f"{top * args.repeats} single-image jobs at once: {burst:.2f} img/s through imageq, "
        f"mean {mean_jobs:.1f} jobs per pipeline call (batch cap {top})"
    )
    if args.json:
        figures = {
            "model": label,
            "size": size,
            "steps": args.steps,
            "dtype": dtype,
            "device": device,
            "bare": bare,
            "bare_compiled": compiled,
            "imageq": queued,
            "single_image_jobs_at_once": {"images_per_s": burst, "mean_jobs_per_call": mean_jobs},
        }
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
