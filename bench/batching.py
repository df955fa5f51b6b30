"""Micro-batching, measured in one run: batched against one-at-a-time, queue against bare.

For each precision and each maximum batch size B, a caption worker (started through
the CLI, ``IMAGEQ_MAX_BATCH_IMAGES=B``) works through a queue that was filled before it
started, and the same model in a bare process runs the same number of images in
``predict`` calls of B. Throughput through the queue is counted from the first measured
job's start to the last one's finish (job records), after warm-up jobs at the same
batch size. Captions have a fixed length (``min_new_tokens = max_new_tokens``), so
random weights cost what real ones would.

    python bench/batching.py                       # BLIP-base on this CPU, batch 1 vs 8
    python bench/batching.py --device cuda:0 --batches 1,32,128 --dtypes bf16,fp16
    python bench/batching.py --speed-options       # bare model: dtype, channels-last, compile

``--model base`` is the full-size BLIP-base captioning architecture with random weights
(``workers.tiny.blip_base_caption_config``; nothing is downloaded); ``--model tiny`` the
tiny test model (measures the queue's own overhead).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api_client.client import Client
from api_client.records import parse_time
from api_client.settings import Settings, process_environment
from workers.services import RedisServer, WorkerProcess

ROOT = Path(__file__).resolve().parent.parent

BASE_VOCAB = 30524  # BERT's 30522 + [DEC] + [ENC], as in Salesforce/blip-image-captioning-base


def build_blip_base(path: Path, seed: int = 0) -> Path:
    """Save a random-weight BLIP-base captioner with a tokenizer of its vocabulary size."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    from workers.tiny import blip_base_caption_config, tiny_vocabulary

    # BERT's layout for the ids the model config names: [PAD]=0, [SEP]=102, [DEC]=30522.
    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [w for w in tiny_vocabulary() if not w.startswith("[")]
    tokens += [f"w{i}" for i in range(BASE_VOCAB - 2 - len(tokens))] + ["[DEC]", "[ENC]"]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 384, "width": 384}),
        tokenizer=tokenizer,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(blip_base_caption_config()).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def build_model(kind: str, path: Path) -> Path:
    if kind == "base":
        return build_blip_base(path)
    from workers.tiny import build_tiny_caption

    return build_tiny_caption(path)


def photo_jpeg(size: tuple[int, int] = (640, 480)) -> bytes:
    """A photo-sized JPEG with detail (decoding and resizing cost what a photo's would)."""
    from PIL import Image

    image = Image.effect_mandelbrot(size, (-2.0, -1.2, 1.0, 1.2), 60).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


@dataclass(frozen=True)
class Case:
    model: Path
    device: str
    dtype: str
    batch: int
    images: int
    tokens: int
    threads: int
    warmup_images: int
    channels_last: bool = False
    torch_compile: bool = False
    #: The worker's jobs in flight (0: the launcher's default for the batch size).
    concurrency: int = 0

    def generation(self) -> dict[str, int]:
        return {"max_new_tokens": self.tokens, "min_new_tokens": self.tokens}

    def env(self) -> dict[str, str]:
        return {
            "IMAGEQ_DTYPE": self.dtype,
            "IMAGEQ_CHANNELS_LAST": "1" if self.channels_last else "0",
            "IMAGEQ_TORCH_COMPILE": "1" if self.torch_compile else "0",
            "IMAGEQ_MAX_BATCH_IMAGES": str(self.batch),
            "OMP_NUM_THREADS": str(self.threads),
            "MKL_NUM_THREADS": str(self.threads),
            "TOKENIZERS_PARALLELISM": "false",
        }


# -- the bare model, in a process of its own -------------------------------------------


def bare_child(case: Case) -> dict[str, Any]:
    """Runs in the child: warm up, then ``case.images`` images in ``predict`` calls of B."""
    import torch
    from PIL import Image

    from api_client.schemas import GenerationOptions
    from workers.devices import SpeedOptions
    from workers.predictors.caption import CaptionItem, CaptionPredictor

    torch.set_num_threads(case.threads)
    speed = SpeedOptions(
        dtype=case.dtype, channels_last=case.channels_last, torch_compile=case.torch_compile
    )
    predictor = CaptionPredictor(str(case.model), speed=speed)
    predictor.setup(case.device)
    image = Image.open(io.BytesIO(photo_jpeg())).convert("RGB")
    options = GenerationOptions(max_new_tokens=case.tokens, min_new_tokens=case.tokens)

    def run(n: int) -> None:
        predictor.predict([CaptionItem(image, None, options) for _ in range(n)])
        if predictor.device.startswith("cuda"):
            torch.cuda.synchronize()

    run(case.warmup_images)
    done, began = 0, time.perf_counter()
    while done < case.images:
        n = min(case.batch, case.images - done)
        run(n)
        done += n
    return {"images_per_s": done / (time.perf_counter() - began)}


def run_bare(case: Case, env: dict[str, str]) -> float:
    fields = {**case.__dict__, "model": str(case.model)}
    argv = [sys.executable, __file__, "_bare", json.dumps(fields)]
    result = subprocess.run(
        argv, env={**env, **case.env()}, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"bare run failed:\n{result.stderr[-3000:]}")
    return float(json.loads(result.stdout.strip().splitlines()[-1])["images_per_s"])


# -- through the queue -----------------------------------------------------------------


def run_queue(
    case: Case, env: dict[str, str], client: Client, uri: str, tmp: Path, per_job: int
) -> tuple[float, list[int]]:
    """Warm a worker up, pause its consumer, fill the queue, resume: time the jobs.

    The measured jobs are all waiting when the worker (warm, at this batch size) starts
    on them, so the client's submit rate and the worker's start-up stay out of the count.
    """
    from celery import Celery

    from api_client.celery_config import celery_config
    from api_client.names import queue_name

    settings = Settings.from_env(env)
    control = Celery("bench-control", set_as_current=False)
    control.conf.update(celery_config(settings))
    queue = queue_name("caption", settings.queue_prefix)
    generation = case.generation()
    name = f"caption-b{case.batch}-{case.dtype}@bench"
    # A later --device overrides WorkerProcess's default of cpu (argparse keeps the last).
    extra = ["--device", case.device]
    if case.concurrency:
        extra += ["--concurrency", str(case.concurrency)]
    worker = WorkerProcess("caption", {**env, **case.env()}, name, tmp / f"{name}.log", *extra)
    worker.start()
    try:
        worker.wait_ready(client.redis, client.store.key("worker", name), timeout_s=900)
        warmup = [
            client.caption(images=[uri] * per_job, generation=generation).id
            for _ in range(max(1, -(-case.warmup_images // per_job)))
        ]
        for job_id in warmup:
            _check(client.wait(job_id, 1800), worker)
        paused = control.control.cancel_consumer(queue, destination=[name], reply=True, timeout=10)
        if not paused:
            raise RuntimeError(f"worker {name} did not answer cancel_consumer")
        measured = [
            client.caption(images=[uri] * per_job, generation=generation).id
            for _ in range(max(1, case.images // per_job))
        ]
        control.control.add_consumer(queue, destination=[name], reply=True, timeout=10)
        records = [_check(client.wait(job_id, 1800), worker) for job_id in measured]
    finally:
        worker.stop()
        control.close()
    starts = [parse_time(r.started_at) or 0.0 for r in records]
    ends = [parse_time(r.finished_at) or 0.0 for r in records]
    images = len(records) * per_job
    return images / (max(ends) - min(starts)), [int(r.metrics["batch_size"]) for r in records]


def _check(record: Any, worker: WorkerProcess) -> Any:
    if record.status != "succeeded":
        raise RuntimeError(
            f"job {record.id} {record.status}: {record.error}\n"
            + worker.log_path.read_text()[-3000:]
        )
    return record


# -- the report ------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _verdict(value: float, target: float) -> str:
    return f"[target >= {target}x: {'ok' if value >= target else 'MISSED'}]"


class Report:
    def __init__(self, title: str) -> None:
        self.title = title
        self.rows: list[dict[str, Any]] = []

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def print_batching(self, batches: list[int]) -> None:
        print(f"\n{self.title}; images/s")
        print(f"{'dtype':6}{'batch':>6}{'queue':>10}{'bare':>10}{'queue/bare':>12}  batch sizes")
        for r in self.rows:
            sizes = r["sizes"]
            seen = f"{min(sizes)}..{max(sizes)}, mean {sum(sizes) / len(sizes):.1f}"
            ratio = r["queue"] / r["bare"]
            print(
                f"{r['dtype']:6}{r['batch']:>6}{r['queue']:>10.3f}{r['bare']:>10.3f}"
                f"{ratio:>11.2f}x  {seen}"
            )
        one, top = batches[0], batches[-1]
        for dtype in dict.fromkeys(r["dtype"] for r in self.rows):
            by = {r["batch"]: r for r in self.rows if r["dtype"] == dtype}
            for batch in batches[1:]:
                gain = by[batch]["queue"] / by[one]["queue"]
                print(
                    f"{dtype}: micro-batched ({batch}) / one-at-a-time ({one}) through the "
                    f"queue: {gain:.2f}x  {_verdict(gain, 1.3) if batch == top else ''}"
                )
            ratio = by[top]["queue"] / by[top]["bare"]
            print(f"{dtype}: queue / bare at batch {top}: {ratio:.2f}x  {_verdict(ratio, 0.9)}")

    def print_speed(self) -> None:
        print(f"\n{self.title}; bare model, images/s")
        base = self.rows[0]["bare"]
        for r in self.rows:
            print(f"{r['label']:28}{r['bare']:>10.3f}{r['bare'] / base:>9.2f}x")


def speed_options(
    report: Report, case: Any, env: dict[str, str], batch: int, cuda: bool, repeats: int
) -> None:
    """Each speed setting alone against the default precision, bare, at one batch size."""
    plain = "fp16" if cuda else "fp32"
    other = "bf16"
    variants = [
        (f"{plain} (default)", case(plain, batch)),
        (other, case(other, batch)),
        (f"{plain} + channels_last", case(plain, batch, channels_last=True)),
        (f"{plain} + torch.compile", case(plain, batch, torch_compile=True)),
    ]
    for label, c in variants:
        print(f"  {label}: {c.images} images ...", flush=True)
        report.add(label=label, batch=batch, bare=max(run_bare(c, env) for _ in range(repeats)))
    report.print_speed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("base", "tiny"), default="base")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    parser.add_argument(
        "--dtypes", help="auto,fp32,fp16,bf16 (default: fp32 on cpu, else bf16,fp16)"
    )
    parser.add_argument("--batches", default="1,8", help="maximum batch sizes to compare")
    parser.add_argument("--rounds", type=int, default=2, help="full batches measured per case")
    parser.add_argument("--min-images", type=int, default=6, help="images measured at least")
    parser.add_argument("--images-per-job", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=20, help="caption length (fixed)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per model process (2 cores: 1)"
    )
    parser.add_argument(
        "--concurrency-factor",
        type=float,
        default=0,
        help="worker jobs in flight = this x the batch size (default: the launcher's choice)",
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs of each case, alternated; the best counts"
    )
    parser.add_argument("--speed-options", action="store_true", help="bare model: each option")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="imageq-bench-batching-"))
    try:
        return run(args, tmp)
    finally:
        # The base model alone is 900 MB.
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, tmp: Path) -> int:
    began = time.monotonic()
    print(f"building the {args.model} model in {tmp} ...", flush=True)
    model = build_model(args.model, tmp / "model")
    env = process_environment()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cuda = args.device.startswith("cuda")
    dtypes = (args.dtypes or ("bf16,fp16" if cuda else "fp32")).split(",")
    batches = _ints(args.batches)
    report = Report(
        f"BLIP-{args.model} (random weights) on {args.device}, {args.tokens}-token captions, "
        f"{args.images_per_job} image(s) per job, {args.threads} torch thread(s) per process, "
        f"best of {args.repeats}"
    )

    def case(dtype: str, batch: int, **options: bool) -> Case:
        images = max(batch * args.rounds, args.min_images)
        images -= images % args.images_per_job
        # GPUs (and compiled graphs) pay for a new batch size once: warm up at full size.
        warm = batch if cuda or options.get("torch_compile") else 1
        factor = args.concurrency_factor
        concurrency = max(2, round(factor * batch)) if factor else 0
        return Case(
            model,
            args.device,
            dtype,
            batch,
            images,
            args.tokens,
            args.threads,
            warm,
            concurrency=concurrency,
            **options,
        )

    if args.speed_options:
        speed_options(report, case, env, batches[-1], cuda, args.repeats)
    else:
        redis_server = RedisServer(tmp / "redis", appendonly=False).start()
        env.update(
            IMAGEQ_BROKER_URL=redis_server.url,
            IMAGEQ_MODEL_CAPTION=str(model),
            IMAGEQ_STORAGE_URL=f"file://{tmp / 'storage'}",
            IMAGEQ_QUEUE_PREFIX="bench-",
        )
        client = Client(Settings.from_env(env))
        uri = "data:image/jpeg;base64," + base64.b64encode(photo_jpeg()).decode()
        try:
            for dtype in dtypes:
                cases = [case(dtype, batch) for batch in batches]
                best: dict[int, tuple[tuple[float, list[int]], float]] = {}
                # Alternated, best of each: other load on the machine only ever slows a
                # run down, so the best run is the closest to the code's own speed.
                for rep in range(args.repeats):
                    for c in cases:
                        print(f"  {dtype} batch {c.batch}: {c.images} images, run {rep + 1}")
                        queued = run_queue(c, env, client, uri, tmp, args.images_per_job)
                        bare = run_bare(c, env)
                        if c.batch in best:
                            queued = max(queued, best[c.batch][0], key=lambda q: q[0])
                            bare = max(bare, best[c.batch][1])
                        best[c.batch] = (queued, bare)
                for batch, ((rate, sizes), bare) in best.items():
                    report.add(dtype=dtype, batch=batch, queue=rate, bare=bare, sizes=sizes)
        finally:
            client.close()
            redis_server.stop()
        report.print_batching(batches)
    print(f"(total {time.monotonic() - began:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(report.rows, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_bare":
        fields = json.loads(sys.argv[2])
        fields["model"] = Path(fields["model"])
        print(json.dumps(bare_child(Case(**fields))))
        sys.exit(0)
    sys.exit(main())
