"""LoRA training speed on the SD 1.5 UNet architecture (random weights, nothing downloaded).

Builds a full-size SD 1.5 checkpoint with random weights (the cost of a step depends on
the architecture, not the weights), a small dataset of random images, and the finetune
worker's ``DiffusionTrainer`` (frozen weights in bfloat16, LoRA in float32, latents and
text embeddings cached). Measures, in one run on one device:

- the bare step: loss, backward, AdamW step;
- imageq's training loop (``run_training``): the same steps plus gradient clipping, the
  LR schedule, a per-step progress callback and checkpoints to local storage;

and prints steps/s, images/s, their ratio and peak GPU memory. ``--tiny`` runs a tiny SD
on the CPU at 64 px as a smoke test (the numbers then mean nothing).

    python bench/gpu_finetune.py [--steps 50] [--resolution 512] [--batch 4] [--rank 8]
    python bench/gpu_finetune.py --tiny
    python bench/gpu_finetune.py --json result.json   # also writes the figures as JSON
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imageq.api_client.settings import Settings


def make_dataset(folder: Path, count: int, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a photo of thing {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    return folder


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from imageq.workers.io.storage import LocalStorage
    from imageq.workers.testing.tiny_diffusion import build_sd15_random, build_tiny_diffusion
    from imageq.workers.training.checkpoints import CheckpointStore
    from imageq.workers.training.datasets import read_dataset
    from imageq.workers.training.loop import LoopConfig, batch_indices, run_training
    from imageq.workers.training.lora_diffusion import DiffusionTrainer

    device = "cpu" if args.tiny else args.device
    if args.tiny:
        torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="imageq-gpu-finetune-"))
    started = time.monotonic()
    build = build_tiny_diffusion if args.tiny else build_sd15_random
    model = build(tmp / "model", seed=0)
    what = "tiny" if args.tiny else "SD 1.5"
    print(f"built the {what} checkpoint in {time.monotonic() - started:.0f} s")
    settings = Settings(model_diffusion=str(model), half_precision=not args.fp32)
    dataset = read_dataset(
        make_dataset(tmp / "dataset", args.examples, args.resolution),
        settings,
        allow_missing_text=False,
    )
    started = time.monotonic()
    trainer = DiffusionTrainer(
        settings, device, dataset, rank=args.rank, alpha=args.rank, resolution=args.resolution
    )
    prepare_s = time.monotonic() - started
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    params = [p for _, p in trainer.trainable()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)

    def bare(steps: int) -> float:
        sync(device)
        began = time.monotonic()
        for step in range(1, steps + 1):
            indices = batch_indices(step, args.batch, len(dataset), 0)
            trainer.loss(indices, generator).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
        return steps / (time.monotonic() - began)

    bare(args.warmup)
    bare_rate = bare(args.steps)

    config = LoopConfig(
        max_steps=args.warmup + args.steps,
        batch_size=args.batch,
        learning_rate=1e-4,
        checkpoint_every=max(1, (args.warmup + args.steps) // 2),
        seed=0,
        examples=len(dataset),
    )
    marks: dict[int, float] = {}

    def control(step: int, total: int, extra: dict[str, Any]) -> None:
        if step in (args.warmup, total):
            sync(device)
            marks[step] = time.monotonic()

    store = CheckpointStore(LocalStorage(tmp / "storage"), "checkpoints/")
    result = run_training(trainer, config, store, control)
    loop_rate = args.steps / (marks[config.max_steps] - marks[args.warmup])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    figures = {
        "device": name,
        "model": "tiny SD" if args.tiny else "SD 1.5 architecture, random weights",
        "dtype": str(trainer.dtype).removeprefix("torch."),
        "resolution": args.resolution,
        "batch": args.batch,
        "rank": args.rank,
        "lora_parameters": sum(p.numel() for p in params),
        "prepare_s": round(prepare_s, 2),
        "bare_steps_per_s": round(bare_rate, 3),
        "loop_steps_per_s": round(loop_rate, 3),
        "loop_vs_bare": round(loop_rate / bare_rate, 3),
        "images_per_s": round(loop_rate * args.batch, 2),
        "peak_memory_gib": None if peak is None else round(peak, 2),
        "checkpoints": result.checkpoints,
    }
    print(
        f"\nLoRA training, {figures['model']}, {args.resolution}x{args.resolution}, batch "
        f"{args.batch}, rank {args.rank}, {figures['dtype']} on {name}"
    )
    print(f"{'':40}{'steps/s':>10}{'images/s':>10}")
    for label, rate in (
        ("bare step (loss, backward, AdamW)", bare_rate),
        ("imageq loop (+progress, checkpoints)", loop_rate),
    ):
        print(f"{label:40}{rate:10.3f}{rate * args.batch:10.2f}")
    print(f"ratio loop/bare: {loop_rate / bare_rate:.3f}x", end="")
    print(f"; peak GPU memory {peak:.2f} GiB" if peak is not None else "")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny SD on the CPU (smoke test)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--fp32", action="store_true", help="no bfloat16 on the GPU")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    defaults = (10, 64, 2) if args.tiny else (50, 512, 4)
    args.steps = args.steps or defaults[0]
    args.resolution = args.resolution or defaults[1]
    args.batch = args.batch or defaults[2]
    figures = run(args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
