"""Generate, inpaint and style through real worker processes on the tiny SD pipeline.

Three deployments: ``sd`` (a diffusion worker without IP-Adapter, and the webhooks
worker), ``ip`` (a diffusion worker with the tiny IP-Adapter) and ``inp`` (a dedicated
inpainting worker). Every worker is started through the CLI and loads its checkpoint
with ``from_pretrained``.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from imageq.api_client.schemas import JobRecord
from imageq.workers.io.adapter_registry import AdapterRegistry
from imageq.workers.io.storage import open_storage
from imageq.workers.predictors.adapters import LORA_WEIGHT_NAME
from imageq.workers.predictors.diffusion_png import read_parameters
from imageq.workers.testing.services import WebhookReceiver, wait_until
from tests.fixtures.services import Stack
from tests.helpers import data_uri

FAST: dict[str, Any] = {"width": 64, "height": 64, "steps": 3}
# Long enough to be canceled mid-run even on a fast machine (about 40 ms a step here).
SLOW: dict[str, Any] = {"width": 256, "height": 256, "steps": 150}


def noise_uri(seed: int, size: tuple[int, int] = (64, 64)) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return data_uri(buffer.getvalue())


def mask_uri(size: tuple[int, int] = (64, 64)) -> str:
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))  # white (left half) is repainted
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return data_uri(buffer.getvalue())


@pytest.fixture(scope="module")
def stacks(
    make_stack: Callable[..., Stack],
    tiny_sd_model: Path,
    tiny_inpaint_model: Path,
    tiny_ip_adapter: Path,
) -> dict[str, Stack]:
    models = {
        "IMAGEQ_MODEL_DIFFUSION": str(tiny_sd_model),
        "IMAGEQ_MODEL_INPAINT": str(tiny_inpaint_model),
    }
    sd = make_stack(**models)
    ip = make_stack(**models, IMAGEQ_IP_ADAPTER=str(tiny_ip_adapter))
    inp = make_stack(**models)
    # Started together so that their model loads overlap.
    started = [
        (sd, sd.worker("webhooks", "webhooks@diff", ready=False)),
        (sd, sd.worker("diffusion", "sd@diff", ready=False)),
        (ip, ip.worker("diffusion", "sd-ip@diff", ready=False)),
        (inp, inp.worker("inpaint", "inpaint@diff", ready=False)),
    ]
    for stack, worker in started:
        worker.wait_ready(stack.redis, stack.store.keys.worker(worker.name))
    return {"sd": sd, "ip": ip, "inp": inp}


@pytest.fixture(scope="module")
def sd(stacks: dict[str, Stack]) -> Stack:
    return stacks["sd"]


def done(stack: Stack, record: JobRecord, timeout_s: float = 60) -> JobRecord:
    return stack.client.wait(record.id, timeout_s)


def succeeded(stack: Stack, record: JobRecord) -> JobRecord:
    final = done(stack, record)
    assert final.status == "succeeded", final.error
    return final


def stored(stack: Stack, record: JobRecord) -> list[bytes]:
    """The job's PNGs as they are in storage, checked against the output document."""
    assert record.output is not None
    out = []
    for i, entry in enumerate(record.output["images"]):
        path = stack.storage_path("jobs", record.id, f"image-{i}.png")
        assert entry["uri"].endswith(f"jobs/{record.id}/image-{i}.png")
        out.append(path.read_bytes())
    return out


def job_files(stack: Stack, job_id: str) -> list[str]:
    return sorted(p.name for p in stack.storage_path("jobs", job_id).iterdir())


def generate(stack: Stack, **fields: Any) -> JobRecord:
    return stack.client.generate(fields.pop("prompt", "a cat"), **{**FAST, **fields})


def test_generate_stores_pngs_and_the_same_seed_gives_the_same_bytes(sd: Stack) -> None:
    first = succeeded(sd, generate(sd, seed=7, num_images=2, negative_prompt="blurry"))
    assert first.worker == "sd@diff" and first.model == sd.settings.model_diffusion
    out = first.output
    assert out is not None and out["seeds"] == [7, 8]
    assert [(im["seed"], im["width"], im["height"]) for im in out["images"]] == [
        (7, 64, 64),
        (8, 64, 64),
    ]
    assert out["parameters"]["prompt"] == "a cat" and "seed" not in out["parameters"]
    # preview.jpg: its latest step preview (IMAGEQ_PREVIEWS is on by default).
    assert job_files(sd, first.id) == ["image-0.png", "image-1.png", "preview.jpg", "result.json"]
    pngs = stored(sd, first)
    assert pngs[0] != pngs[1]
    text = read_parameters(pngs[0])
    assert text is not None and text.startswith("a cat\nNegative prompt: blurry\nSteps: 3")
    assert "Seed: 7, Size: 64x64" in text
    again = succeeded(sd, generate(sd, seed=7, num_images=2, negative_prompt="blurry"))
    assert stored(sd, again) == pngs
    other = succeeded(sd, generate(sd, seed=9, negative_prompt="blurry"))
    assert stored(sd, other)[0] not in pngs


def test_scheduler_by_display_name(sd: Stack) -> None:
    records = {name: generate(sd, seed=3, scheduler=name) for name in ("Euler a", "DDIM")}
    finals = {name: succeeded(sd, record) for name, record in records.items()}
    euler = finals["Euler a"].output
    assert euler is not None and euler["parameters"]["scheduler"] == "euler_ancestral"
    text = read_parameters(stored(sd, finals["Euler a"])[0])
    assert text is not None and "Sampler: Euler a" in text
    assert stored(sd, finals["Euler a"]) != stored(sd, finals["DDIM"])


def test_progress_is_recorded_and_sent_as_webhooks(sd: Stack, receiver: WebhookReceiver) -> None:
    hook = {"url": receiver.url("/diff-progress"), "events": ["job.progress", "job.succeeded"]}
    job = generate(sd, seed=1, steps=4, scheduler="ddim", webhook=hook)
    final = succeeded(sd, job)
    assert final.progress is not None
    preview = final.progress.pop("preview")
    assert final.progress == {"step": 4, "total": 4, "stage": "denoising"}
    assert preview["uri"].endswith(f"jobs/{job.id}/preview.jpg") and preview["step"] >= 1
    events = receiver.wait_for(
        lambda d: d.path == "/diff-progress" and d.json()["data"]["id"] == job.id, count=2
    )
    progress = [e.json()["data"]["progress"] for e in events if e.json()["type"] == "job.progress"]
    assert progress and progress[-1]["total"] == 4
    assert [p["step"] for p in progress] == sorted(p["step"] for p in progress)
    ids = [e.headers["webhook-id"] for e in events]
    assert len(set(ids)) == len(ids)


def test_preview_webhooks_for_a_subscriber_only(sd: Stack, receiver: WebhookReceiver) -> None:
    hook = {"url": receiver.url("/diff-preview"), "events": ["job.preview", "job.succeeded"]}
    job = generate(sd, seed=2, width=256, height=256, steps=60, webhook=hook)
    final = succeeded(sd, job)
    assert final.progress is not None and "preview" in final.progress
    got = receiver.wait_for(
        lambda d: d.path == "/diff-preview" and d.json()["type"] == "job.succeeded", count=1
    )
    assert got
    time.sleep(0.5)
    events = [d for d in receiver.for_job(job.id) if d.path == "/diff-preview"]
    previews = [d for d in events if d.json()["type"] == "job.preview"]
    assert len(previews) >= 2, [d.json()["type"] for d in events]
    shown = [d.json()["data"]["progress"]["preview"] for d in previews]
    assert all(p["uri"].endswith(f"jobs/{job.id}/preview.jpg") for p in shown)
    steps = [p["step"] for p in shown]
    ids = [d.headers["webhook-id"] for d in previews]
    assert len(set(ids)) == len(ids) and all(
        i.endswith(f"_preview_a1_{s}") for i, s in zip(ids, steps, strict=True)
    )
    # Without job.preview in its events (the default), a job sends none.
    plain = succeeded(
        sd,
        generate(
            sd,
            seed=3,
            width=256,
            height=256,
            steps=60,
            webhook={"url": receiver.url("/diff-plain")},
        ),
    )
    receiver.wait_for(lambda d: d.path == "/diff-plain", count=1)
    assert [d.json()["type"] for d in receiver.for_job(plain.id)] == ["job.succeeded"]


def running_at_step(stack: Stack, job_id: str, step: int) -> None:
    def reached() -> bool:
        record = stack.client.get(job_id)
        assert record.status in ("queued", "running"), record.status
        return bool(record.progress) and int(record.progress["step"]) >= step

    wait_until(reached, 60, f"job {job_id} at step {step}", every_s=0.02)


def test_cancel_stops_a_running_job_and_the_worker_serves_the_next(sd: Stack) -> None:
    job = generate(sd, seed=5, **SLOW)
    running_at_step(sd, job.id, 2)
    sd.client.cancel(job.id)
    final = done(sd, job)
    assert final.status == "canceled" and final.error is not None
    assert final.error.code == "canceled"
    assert final.progress is not None and 2 <= final.progress["step"] < final.progress["total"]
    assert final.output is None and job_files(sd, job.id) == ["preview.jpg", "result.json"]
    after = succeeded(sd, generate(sd, seed=5))
    assert after.worker == "sd@diff" and len(stored(sd, after)) == 1


def test_timeout_stops_a_running_job(sd: Stack) -> None:
    final = done(sd, generate(sd, seed=6, timeout_s=1.0, **SLOW))
    assert final.status == "failed" and final.error is not None
    assert final.error.code == "timeout"
    assert final.progress is not None and final.progress["step"] < final.progress["total"]
    assert job_files(sd, final.id) == ["preview.jpg", "result.json"]


def rgb(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_compatible_jobs_share_a_call_and_get_their_own_images(sd: Stack) -> None:
    jobs = [
        {"prompt": "a cat", "seed": 10, "num_images": 2, "negative_prompt": "ugly"},
        {"prompt": "the dog", "seed": 20, "num_images": 2},
        {"prompt": "a red cat on a log", "seed": 30, "num_images": 2},
    ]
    alone = []
    for fields in jobs:
        record = succeeded(sd, generate(sd, **fields))
        assert record.metrics["batch_jobs"] == 1
        alone.append(stored(sd, record))
    # A job of another size holds the pipeline while the others arrive and wait.
    blocker = generate(sd, seed=1, width=256, height=256, steps=40)
    running_at_step(sd, blocker.id, 1)
    waiting = [generate(sd, **fields) for fields in jobs]
    batched = [succeeded(sd, record) for record in waiting]
    assert succeeded(sd, blocker).metrics["batch_jobs"] == 1
    assert [r.metrics["batch_jobs"] for r in batched] == [3, 3, 3]
    assert all(r.metrics["batch_size"] == 6 for r in batched)
    assert [r.output["seeds"] for r in batched if r.output] == [[10, 11], [20, 21], [30, 31]]
    # Each job drew its own noise: the same images as alone, up to the CPU kernels'
    # rounding, which depends on the batch's size and the job's place in it (the
    # predictor's docstring); the parameters text is the same to the byte.
    for lone_pngs, record in zip(alone, batched, strict=True):
        for lone, png in zip(lone_pngs, stored(sd, record), strict=True):
            assert read_parameters(png) == read_parameters(lone)
            diff = np.abs(rgb(png) - rgb(lone))
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mask": mask_uri((64, 32))}, "mask: 64x32 does not fit the 64x64 image"),
        ({"mask": data_uri(b"not an image")}, "input.mask:"),
        ({"image": noise_uri(0, (40, 40)), "mask": mask_uri((40, 40))}, "too small"),
        ({"strength": 0.2, "steps": 3}, "strength: 3 steps at strength 0.2"),
        ({"adapters": [{"name": "nope"}]}, "no adapter named 'nope'"),
    ],
)
def test_bad_inpaint_input_fails_as_invalid_input(
    sd: Stack, fields: dict[str, Any], message: str
) -> None:
    args = {"image": noise_uri(0), "mask": mask_uri(), "prompt": "a cat", **fields}
    final = done(sd, sd.client.inpaint(**args))
    assert final.status == "failed" and final.error is not None, final
    assert final.error.code == "invalid_input" and message in final.error.message
    assert final.progress is None  # refused before any pipeline step


def test_size_limits_fail_before_gpu_work(sd: Stack) -> None:
    big = done(sd, generate(sd, width=2048, height=1024))
    assert big.error is not None and big.error.code == "invalid_input"
    assert "IMAGEQ_MAX_OUTPUT_PIXELS" in big.error.message and big.progress is None
    assert sd.workers[1].alive()


def test_inpaint_repaints_the_white_part_only_roughly(sd: Stack) -> None:
    image = noise_uri(0, (72, 64))
    mask = mask_uri((36, 32))  # half size, same aspect ratio: resized
    job = sd.client.inpaint(image, mask, "a cat", seed=3, steps=3, num_images=2, strength=1.0)
    final = succeeded(sd, job)
    assert final.output is not None
    assert [(im["width"], im["height"]) for im in final.output["images"]] == [(72, 64)] * 2
    assert final.output["parameters"]["strength"] == 1.0
    text = read_parameters(stored(sd, final)[0])
    assert text is not None and "Denoising strength: 1.0" in text


def test_style_with_a_prompt(sd: Stack) -> None:
    job = sd.client.style(noise_uri(1), style_prompt="oil painting", steps=4, strength=0.5, seed=5)
    final = succeeded(sd, job)
    assert final.output is not None and final.output["parameters"]["prompt"] == "oil painting"
    assert final.progress is not None and final.progress["step"] == final.progress["total"]


def test_style_image_without_ip_adapter_fails_clearly(sd: Stack) -> None:
    final = done(sd, sd.client.style(noise_uri(1), style_image=noise_uri(2), steps=4))
    assert final.status == "failed" and final.error is not None
    assert final.error.code == "invalid_input"
    assert "no IP-Adapter" in final.error.message and "IMAGEQ_IP_ADAPTER" in final.error.message


def test_style_image_through_the_ip_adapter(stacks: dict[str, Stack]) -> None:
    ip = stacks["ip"]
    fields: dict[str, Any] = {"style_prompt": "x", "steps": 4, "seed": 5}
    styled = succeeded(ip, ip.client.style(noise_uri(1), style_image=noise_uri(2), **fields))
    plain = succeeded(ip, ip.client.style(noise_uri(1), **fields))
    assert styled.worker == "sd-ip@diff" and styled.output is not None
    assert styled.output["parameters"]["style_scale"] == 0.6
    assert stored(ip, styled) != stored(ip, plain)
    text = read_parameters(stored(ip, styled)[0])
    assert text is not None and "IP-Adapter scale: 0.6" in text


def test_inpaint_worker_serves_from_the_inpainting_checkpoint(stacks: dict[str, Stack]) -> None:
    inp = stacks["inp"]
    job = inp.client.inpaint(noise_uri(0), mask_uri(), "a cat", seed=3, steps=3, strength=0.75)
    final = succeeded(inp, job)
    assert final.worker == "inpaint@diff" and final.model == inp.settings.model_inpaint
    assert len(stored(inp, final)) == 1


def pixels(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as image:
        return image.tobytes()


def test_adapters_published_on_a_running_worker(
    sd: Stack, tiny_lora: Path, tiny_lora_2: Path, tmp_path: Path
) -> None:
    registry = AdapterRegistry(sd.store, open_storage(sd.settings), tmp_path / "cache")
    base = stored(sd, succeeded(sd, generate(sd, seed=11)))[0]
    # Published after the worker started: names are resolved per job.
    registry.publish(
        "tiny-style", {LORA_WEIGHT_NAME: (tiny_lora / LORA_WEIGHT_NAME).read_bytes()}, {}
    )
    styled = succeeded(sd, generate(sd, seed=11, adapters=[{"name": "tiny-style"}]))
    lora = stored(sd, styled)[0]
    assert pixels(lora) != pixels(base)
    text = read_parameters(lora)
    assert text is not None and 'Adapters: "tiny-style:1.0"' in text
    # Without it the next job gets the base image back, to the byte.
    assert stored(sd, succeeded(sd, generate(sd, seed=11)))[0] == base
    half = succeeded(sd, generate(sd, seed=11, adapters=[{"name": "tiny-style", "scale": 0.5}]))
    assert pixels(stored(sd, half)[0]) not in (pixels(lora), pixels(base))
    # Re-published under the same name: the running worker picks up the new weights.
    registry.publish(
        "tiny-style",
        {LORA_WEIGHT_NAME: (tiny_lora_2 / LORA_WEIGHT_NAME).read_bytes()},
        {},
        overwrite=True,
    )
    second = succeeded(sd, generate(sd, seed=11, adapters=[{"name": "tiny-style"}]))
    assert pixels(stored(sd, second)[0]) not in (pixels(lora), pixels(base))
    assert stored(sd, succeeded(sd, generate(sd, seed=11)))[0] == base
