"""What the queue adds to LoRA training: a finetune job against the bare training loop.

The same tiny model (BLIP for ``caption``, SD for ``diffusion``), the same dataset, CPU,
one thread each. The bare loop is the trainer's loss, backward and AdamW step in this
process, nothing else. The job goes through the finetune broker (its own Redis
database) to a real finetune worker, which also validates the dataset, records progress
after every step, writes checkpoints and publishes the adapter. Prints steps/s of the
bare loop, of the job's training phase (``metrics.train_s``) and of the whole job
(submit -> final record seen), and their ratios; one run.

    python bench/finetune.py [--target caption|diffusion] [--steps 300] [--batch 2]
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
import zipfile
from pathlib import Path

from PIL import Image

from api_client.client import Client
from api_client.records import connect
from api_client.settings import Settings, process_environment
from workers.testing.services import RedisServer, WorkerProcess
from workers.testing.tiny import build_tiny_caption
from workers.testing.tiny_diffusion import build_tiny_diffusion

WORDS = ("a", "red", "bus", "near", "tree", "two", "dogs", "in", "snow", "zebra", "on", "cat")


def make_dataset(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        color = ((i * 67) % 256, (i * 131) % 256, (i * 29) % 256)
        Image.new("RGB", (72, 64), color).save(folder / f"{i}.png")
        text = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(5))
        lines.append(json.dumps({"file_name": f"{i}.png", "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    return folder


def zip_folder(folder: Path, target: Path) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, path.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(buf.getvalue())
    return target


def bare_steps_per_s(
    target: str, settings: Settings, folder: Path, steps: int, batch: int
) -> float:
    import torch

    from workers.training.datasets import read_dataset
    from workers.training.loop import batch_indices
    from workers.training.lora_caption import CaptionTrainer
    from workers.training.lora_diffusion import DiffusionTrainer

    torch.set_num_threads(1)  # as the worker runs (OMP_NUM_THREADS=1)
    dataset = read_dataset(folder, settings, allow_missing_text=False)
    if target == "caption":
        trainer: CaptionTrainer | DiffusionTrainer = CaptionTrainer(
            settings, "cpu", dataset, rank=8, alpha=8
        )
    else:
        trainer = DiffusionTrainer(settings, "cpu", dataset, rank=8, alpha=8, resolution=64)
    params = [p for _, p in trainer.trainable()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    rates = []
    # Twice, best of the two: the first pass also pays one-off allocations.
    for _ in range(2):
        began = time.monotonic()
        for step in range(1, steps + 1):
            loss = trainer.loss(batch_indices(step, batch, len(dataset), 0), generator)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        rates.append(steps / (time.monotonic() - began))
    return max(rates)


def run(target: str, steps: int, batch: int, examples: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="imageq-finetune-bench-"))
    redis_server = RedisServer(tmp / "redis", appendonly=False).start()
    if target == "caption":
        model = build_tiny_caption(tmp / "tiny-caption")
    else:
        model = build_tiny_diffusion(tmp / "tiny-sd")
    storage = tmp / "storage"
    env = process_environment()
    env.update(
        IMAGEQ_BROKER_URL=redis_server.url,
        IMAGEQ_FINETUNE_BROKER_URL=redis_server.url.rsplit("/", 1)[0] + "/1",
        IMAGEQ_MODEL_CAPTION=str(model),
        IMAGEQ_MODEL_DIFFUSION=str(model),
        IMAGEQ_STORAGE_URL=f"file://{storage}",
        IMAGEQ_QUEUE_PREFIX="bench-",
        OMP_NUM_THREADS="1",
    )
    settings = Settings.from_env(env)
    folder = make_dataset(tmp / "dataset", examples)
    archive = zip_folder(folder, storage / "datasets" / "bench.zip")
    client = Client(settings)
    worker = WorkerProcess("finetune", env, "finetune@bench", tmp / "worker.log").start()
    try:
        # Measured once the worker is idle, so the two never share the CPU.
        worker.wait_ready(connect(redis_server.url), client.store.key("worker", "finetune@bench"))
        bare = bare_steps_per_s(target, settings, folder, steps, batch)
        began = time.monotonic()
        job = client.finetune(
            target=target,
            dataset=archive.as_uri(),
            name="bench",
            rank=8,
            alpha=8,
            learning_rate=1e-4,
            max_steps=steps,
            batch_size=batch,
            resolution=64,
            checkpoint_every=max(1, steps // 4),
        )
        record = client.wait(job.id, 1800)
        whole = steps / (time.monotonic() - began)
        assert record.status == "succeeded", record.error
        queued = steps / float(record.metrics["train_s"])
        print(
            f"\nfinetune overhead: {target}, tiny model on CPU (1 thread), {examples} images, "
            f"batch {batch}, {steps} steps, a checkpoint every {max(1, steps // 4)} steps"
        )
        print(f"{'':34}{'steps/s':>10}{'vs bare':>10}")
        for label, rate in (
            ("bare training loop", bare),
            ("finetune job, training phase", queued),
            ("finetune job, submit -> final", whole),
        ):
            print(f"{label:34}{rate:10.2f}{rate / bare:9.2f}x")
        print(
            f"ratio queue/bare (training phase): {queued / bare:.2f}x; whole job "
            f"(dataset, model load, latents, publish included): {whole / bare:.2f}x"
        )
    finally:
        client.close()
        worker.stop()
        redis_server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--target", choices=["caption", "diffusion"], default="caption")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--examples", type=int, default=8)
    args = parser.parse_args()
    run(args.target, args.steps, args.batch, args.examples)
