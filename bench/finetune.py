"""What the queue adds to LoRA training: a finetune job against the bare training loop.

The same tiny model (BLIP for ``caption``, SD for ``diffusion``), the same dataset, CPU,
one thread each. The bare loop is the job's training recipe in this process and nothing
else: the trainer's loss, backward, gradient clipping, AdamW and the warm-up schedule
(``imageq.workers.training.loop``), with no checkpoint, no progress and no stop check. The job
goes through the finetune broker (its own Redis database) to a real finetune worker,
which also validates the dataset, records progress, checks for cancel, timeout, a lost
lease and shutdown after every step, writes checkpoints and publishes the adapter.

Rounds alternate, bare then job: this machine's speed drifts by 20-30% over a minute
(other tenants). The figure that counts is the median of the rounds' side-by-side
ratios (each job against the bare pass just before it); the best of each is shown too.
Prints steps/s of the bare loop, of the job's training phase (``metrics.train_s``) and
of the whole job (submit -> final record seen), and their ratios.

    python bench/finetune.py [--target caption|diffusion] [--steps 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

from PIL import Image

from imageq.api_client.client import Client
from imageq.api_client.records import connect
from imageq.api_client.settings import Settings, process_environment
from imageq.workers.testing.services import RedisServer, WorkerProcess
from imageq.workers.testing.tiny import build_tiny_caption
from imageq.workers.testing.tiny_diffusion import build_tiny_diffusion

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


class BareLoop:
    """The training recipe alone, on a trainer built once (as the worker builds one)."""

    def __init__(self, target: str, settings: Settings, folder: Path, batch: int) -> None:
        import torch

        from imageq.workers.training.datasets import read_dataset
        from imageq.workers.training.lora_caption import CaptionTrainer
        from imageq.workers.training.lora_diffusion import DiffusionTrainer

        torch.set_num_threads(1)  # as the worker runs (OMP_NUM_THREADS=1)
        dataset = read_dataset(folder, settings, allow_missing_text=False)
        self.examples, self.batch = len(dataset), batch
        if target == "caption":
            self.trainer: CaptionTrainer | DiffusionTrainer = CaptionTrainer(
                settings, "cpu", dataset, rank=8, alpha=8
            )
        else:
            self.trainer = DiffusionTrainer(
                settings, "cpu", dataset, rank=8, alpha=8, resolution=64
            )

    def steps_per_s(self, steps: int) -> float:
        import torch

        from imageq.workers.training.loop import MAX_GRAD_NORM, WEIGHT_DECAY, batch_indices

        params = [p for _, p in self.trainer.trainable()]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=WEIGHT_DECAY)
        warmup = min(100, steps // 20)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        generator = torch.Generator().manual_seed(0)
        began = time.monotonic()
        for step in range(1, steps + 1):
            indices = batch_indices(step, self.batch, self.examples, 0)
            loss = self.trainer.loss(indices, generator)
            float(loss.detach())  # the job reads the loss back every step too
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        return steps / (time.monotonic() - began)


def run(
    target: str, steps: int, batch: int, examples: int, rounds: int, checkpoint_every: int
) -> None:
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
    best = {"bare": 0.0, "train": 0.0, "whole": 0.0}
    paired: list[float] = []
    try:
        # Measured once the worker is idle, so the two never share the CPU.
        worker.wait_ready(connect(redis_server.url), client.store.keys.worker("finetune@bench"))
        bare = BareLoop(target, settings, folder, batch)
        bare.steps_per_s(min(steps, 50))  # one-off allocations
        for r in range(rounds):
            rate = bare.steps_per_s(steps)
            best["bare"] = max(best["bare"], rate)
            began = time.monotonic()
            job = client.finetune(
                target=target,
                dataset=archive.as_uri(),
                name=f"bench-{r}",
                rank=8,
                alpha=8,
                learning_rate=1e-4,
                max_steps=steps,
                batch_size=batch,
                resolution=64,
                checkpoint_every=checkpoint_every,
            )
            record = client.wait(job.id, 1800)
            whole = steps / (time.monotonic() - began)
            assert record.status == "succeeded", record.error
            train = steps / float(record.metrics["train_s"])
            best["train"], best["whole"] = max(best["train"], train), max(best["whole"], whole)
            paired.append(train / rate)
            print(
                f"  round {r + 1}/{rounds}: bare {rate:.1f} steps/s, job's training phase "
                f"{train:.1f} ({train / rate:.2f}x)",
                flush=True,
            )
        print(
            f"\nfinetune overhead: {target}, tiny model on CPU (1 thread), {examples} images, "
            f"batch {batch}, {steps} steps, a checkpoint every {checkpoint_every} steps, "
            f"best of {rounds} rounds"
        )
        print(f"{'':34}{'steps/s':>10}{'vs bare':>10}")
        for label, value in (
            ("bare training loop", best["bare"]),
            ("finetune job, training phase", best["train"]),
            ("finetune job, submit -> final", best["whole"]),
        ):
            print(f"{label:34}{value:10.2f}{value / best['bare']:9.2f}x")
        # Each round's job against the bare pass just before it: side by side, so the
        # machine's drift cancels; their median is the figure that counts.
        ratio = statistics.median(paired)
        verdict = "ok" if ratio >= 0.95 else "MISSED"
        print(
            f"ratio queue/bare (training phase): {ratio:.2f}x, the median of the rounds' "
            f"side-by-side ratios ({', '.join(f'{p:.2f}' for p in paired)}) "
            f"[target >= 0.95x: {verdict}]; best against best {best['train'] / best['bare']:.2f}x; "
            f"whole job (dataset, model load, latents, publish included): "
            f"{best['whole'] / best['bare']:.2f}x"
        )
    finally:
        client.close()
        worker.stop()
        redis_server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--target", choices=["caption", "diffusion"], default="caption")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--checkpoint-every", type=int, default=100, help="the job's (default: the contract's)"
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--examples", type=int, default=8)
    args = parser.parse_args()
    run(args.target, args.steps, args.batch, args.examples, args.rounds, args.checkpoint_every)
