"""DiffusionPredictor on tiny random SD checkpoints, through the production loading path.

Run with ``-p tests.fixtures.diffusion_models``.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngImageFile

from imageq.api_client.errors import Canceled, InvalidInput, JobTimeout, ModelError, OutOfMemory
from imageq.api_client.inputs import SCHEDULERS, AdapterRef, GenerateInput, InpaintInput, StyleInput
from imageq.api_client.settings import Settings
from imageq.workers.predictors.adapters import LORA_WEIGHT_NAME
from imageq.workers.predictors.base import BatchedPredictor, BatchInterrupted
from imageq.workers.predictors.diffusion import DiffusionPredictor, GeneratedImage, GenerateJob

REF = "data:image/png;base64,AA=="  # the predictor takes loaded images; refs only validate


def noop(step: int, total: int, info: dict[str, Any]) -> None:
    return None


class Recorder:
    def __init__(self, stop_at: int | None = None, error: Exception | None = None) -> None:
        self.calls: list[tuple[int, int, dict[str, Any]]] = []
        self.stop_at = stop_at
        self.error = error or Canceled("canceled by the test")

    def __call__(self, step: int, total: int, info: dict[str, Any]) -> None:
        self.calls.append((step, total, info))
        if self.stop_at is not None and step >= self.stop_at:
            raise self.error


def gen(**kw: Any) -> GenerateInput:
    fields: dict[str, Any] = {"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": 1}
    return GenerateInput(**{**fields, **kw})


def noise_image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def half_mask(size: tuple[int, int] = (64, 64)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    return mask


def pngs(images: list[GeneratedImage]) -> list[bytes]:
    return [im.png() for im in images]


def png_text(png: bytes) -> str:
    image = Image.open(io.BytesIO(png))
    assert isinstance(image, PngImageFile)
    return image.text["parameters"]


def pixels(image: GeneratedImage) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.png())).convert("RGB")).astype(int)


def make(model: Path, **kw: Any) -> Iterator[DiffusionPredictor]:
    settings = Settings(ip_adapter=str(kw.pop("ip_adapter", "")))
    predictor = DiffusionPredictor(str(model), settings=settings, **kw)
    predictor.setup("cpu")
    yield predictor


@pytest.fixture(scope="module")
def registry(
    tiny_lora: Path, tiny_lora_2: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Adapter name -> local folder; "pub" is a copy the tests re-publish in place."""
    published = tmp_path_factory.mktemp("published")
    shutil.copy(tiny_lora / LORA_WEIGHT_NAME, published / LORA_WEIGHT_NAME)
    return {"tiny": tiny_lora, "tiny.two": tiny_lora_2, "pub": published}


@pytest.fixture(scope="module")
def sd(tiny_sd_model: Path, registry: dict[str, Path]) -> Iterator[DiffusionPredictor]:

    def resolve(name: str) -> Path:
        if name not in registry:
            raise InvalidInput(f"adapters: unknown adapter {name!r}")
        return registry[name]

    yield from make(tiny_sd_model, adapter_path=resolve, max_loaded_adapters=1)


@pytest.fixture(scope="module")
def sd_ip(tiny_sd_model: Path, tiny_ip_adapter: Path) -> Iterator[DiffusionPredictor]:
    yield from make(tiny_sd_model, ip_adapter=tiny_ip_adapter)


@pytest.fixture(scope="module")
def base(sd: DiffusionPredictor) -> list[bytes]:
    """The reference image of ``gen()`` before any other job touched the pipeline."""
    return pngs(sd.run_generate(gen(), noop))


def test_same_seed_gives_same_png_bytes(sd: DiffusionPredictor, base: list[bytes]) -> None:
    again = sd.run_generate(gen(), noop)
    assert pngs(again) == base
    assert (again[0].seed, again[0].width, again[0].height) == (1, 64, 64)


def test_seeds_per_image_and_different_seeds_differ(sd: DiffusionPredictor) -> None:
    out = sd.run_generate(gen(seed=2**32 - 1, num_images=2), noop)
    assert [im.seed for im in out] == [2**32 - 1, 0]
    assert out[0].png() != out[1].png()
    assert pngs(sd.run_generate(gen(seed=7), noop)) != pngs(sd.run_generate(gen(seed=8), noop))


def test_missing_seed_is_drawn_and_reported(sd: DiffusionPredictor) -> None:
    out = sd.run_generate(gen(seed=None), noop)[0]
    assert 0 <= out.seed < 2**32 and out.parameters["seed"] == out.seed
    assert pngs(sd.run_generate(gen(seed=out.seed), noop)) == [out.png()]


def test_every_scheduler_runs_and_none_leaks(sd: DiffusionPredictor, base: list[bytes]) -> None:
    outputs = {name: sd.run_generate(gen(scheduler=name), noop)[0].png() for name in SCHEDULERS}
    assert outputs["default"] == outputs["pndm"] == base[0]  # the tiny model ships PNDM
    assert len(set(outputs.values())) == len(SCHEDULERS) - 1
    assert pngs(sd.run_generate(gen(), noop)) == base


def test_png_carries_a1111_parameters(sd: DiffusionPredictor) -> None:
    out = sd.run_generate(gen(negative_prompt="blurry", scheduler="dpmpp_2m", seed=123), noop)[0]
    text = png_text(out.png())
    assert text == (
        "a cat\nNegative prompt: blurry\nSteps: 2, Sampler: DPM++ 2M, CFG scale: 7.5, "
        "Seed: 123, Size: 64x64, Model: model"
    )
    assert out.parameters["scheduler"] == "dpmpp_2m" and out.parameters["seed"] == 123


def test_progress_is_reported_per_step_with_totals(sd: DiffusionPredictor) -> None:
    ddim = Recorder()
    sd.run_generate(gen(steps=3, scheduler="ddim"), ddim)
    assert [(s, t) for s, t, _ in ddim.calls] == [(1, 3), (2, 3), (3, 3)]
    assert all(info == {"stage": "denoising"} for _, _, info in ddim.calls)
    pndm = Recorder()  # PLMS without Runge-Kutta steps runs one step more than asked
    sd.run_generate(gen(steps=3), pndm)
    assert [s for s, _, _ in pndm.calls] == [1, 2, 3, 4] and {t for _, t, _ in pndm.calls} == {4}


@pytest.mark.parametrize("error", [Canceled("stop"), JobTimeout("late")])
def test_abort_mid_run_then_next_job_matches_a_fresh_run(
    sd: DiffusionPredictor, base: list[bytes], error: Exception
) -> None:
    stop = Recorder(stop_at=1, error=error)
    with pytest.raises(type(error)):
        sd.run_generate(gen(steps=4, adapters=[AdapterRef(name="tiny")]), stop)
    assert len(stop.calls) == 1
    assert pngs(sd.run_generate(gen(), noop)) == base


def test_other_callback_errors_propagate_unchanged(sd: DiffusionPredictor) -> None:
    with pytest.raises(ConnectionError):
        sd.run_generate(gen(), Recorder(stop_at=1, error=ConnectionError("redis down")))


def test_inpaint_with_a_mask(sd: DiffusionPredictor) -> None:
    inp = InpaintInput(image=REF, mask=REF, prompt="a cat", steps=2, seed=3, num_images=2)
    out = sd.run_inpaint(inp, noise_image(0), half_mask(), noop)
    assert [(im.width, im.height, im.seed) for im in out] == [(64, 64, 3), (64, 64, 4)]
    assert "Denoising strength: 1.0" in png_text(out[0].png())
    assert pngs(sd.run_inpaint(inp, noise_image(0), half_mask(), noop)) == pngs(out)


def test_inpaint_mask_of_another_aspect_ratio_is_invalid(sd: DiffusionPredictor) -> None:
    inp = InpaintInput(image=REF, mask=REF, prompt="a cat", steps=2, seed=3)
    with pytest.raises(InvalidInput, match=r"^invalid_input: mask: 64x32 does not fit"):
        sd.run_inpaint(inp, noise_image(0), half_mask((64, 32)), noop)


def test_inpaint_mask_of_same_aspect_ratio_is_resized(sd: DiffusionPredictor) -> None:
    inp = InpaintInput(image=REF, mask=REF, prompt="a cat", steps=2, seed=3)
    small = sd.run_inpaint(inp, noise_image(0), half_mask((32, 32)), noop)
    full = sd.run_inpaint(inp, noise_image(0), half_mask(), noop)
    assert pngs(small) == pngs(full)


def test_inpaint_output_size_rounds_down_to_multiples_of_8(sd: DiffusionPredictor) -> None:
    inp = InpaintInput(image=REF, mask=REF, prompt="a cat", steps=2, seed=3)
    out = sd.run_inpaint(inp, noise_image(0, (70, 79)), half_mask((70, 79)), noop)[0]
    assert (out.width, out.height) == (64, 72)
    with pytest.raises(InvalidInput, match="too small"):
        sd.run_inpaint(inp, noise_image(0, (60, 80)), half_mask((60, 80)), noop)


def test_inpaint_only_worker_uses_the_9_channel_checkpoint(tiny_inpaint_model: Path) -> None:
    predictor = next(make(tiny_inpaint_model, inpaint_only=True))
    inp = InpaintInput(image=REF, mask=REF, prompt="a cat", steps=2, seed=3, strength=0.75)
    progress = Recorder()
    out = predictor.run_inpaint(inp, noise_image(0), half_mask(), progress)
    assert len(out) == 1 and progress.calls[-1][0] == progress.calls[-1][1]
    with pytest.raises(ModelError, match="inpaint only"):
        predictor.run_generate(gen(), noop)


def test_style_with_a_prompt(sd: DiffusionPredictor) -> None:
    inp = StyleInput(image=REF, style_prompt="oil painting", steps=4, strength=0.5, seed=5)
    progress = Recorder()
    out = sd.run_style(inp, noise_image(1), None, progress)[0]
    assert out.parameters["prompt"] == "oil painting"
    assert [s for s, _, _ in progress.calls] == [1, 2, 3]  # int(4 * 0.5) + PLMS's extra step
    assert (
        out.png()
        != sd.run_style(inp.model_copy(update={"strength": 0.75}), noise_image(1), None, noop)[
            0
        ].png()
    )


def test_style_with_too_few_steps_is_invalid(sd: DiffusionPredictor) -> None:
    inp = StyleInput(image=REF, style_prompt="oil painting", steps=2, strength=0.3)
    with pytest.raises(InvalidInput, match=r"^invalid_input: strength:"):
        sd.run_style(inp, noise_image(1), None, noop)


def test_style_image_needs_an_ip_adapter(sd: DiffusionPredictor) -> None:
    inp = StyleInput(image=REF, style_image=REF, steps=4)
    with pytest.raises(InvalidInput, match="set IMAGEQ_IP_ADAPTER"):
        sd.run_style(inp, noise_image(1), noise_image(2), noop)


def test_style_image_through_the_ip_adapter_changes_the_output(
    sd_ip: DiffusionPredictor, sd: DiffusionPredictor, base: list[bytes]
) -> None:
    assert sd_ip.has_ip_adapter
    inp = StyleInput(image=REF, style_image=REF, style_prompt="x", steps=4, seed=5)
    plain = sd_ip.run_style(inp, noise_image(1), None, noop)[0]
    styled = sd_ip.run_style(inp, noise_image(1), noise_image(2), noop)[0]
    other = sd_ip.run_style(inp, noise_image(1), noise_image(3), noop)[0]
    assert len({plain.png(), styled.png(), other.png()}) == 3
    assert styled.parameters["style_scale"] == 0.6
    assert sd_ip.run_style(inp, noise_image(1), noise_image(2), noop)[0].png() == styled.png()
    with pytest.raises(Canceled):
        sd_ip.run_style(inp, noise_image(1), noise_image(2), Recorder(stop_at=1))
    # Outside style jobs the IP-Adapter is detached: text-only jobs see the plain UNet.
    assert pngs(sd_ip.run_generate(gen(), noop)) == base
    assert plain.png() == sd.run_style(inp, noise_image(1), None, noop)[0].png()


def test_lora_changes_the_image_and_leaves_no_trace(
    sd: DiffusionPredictor, base: list[bytes]
) -> None:
    full = sd.run_generate(gen(adapters=[AdapterRef(name="tiny")]), noop)[0]
    half = sd.run_generate(gen(adapters=[AdapterRef(name="tiny", scale=0.5)]), noop)[0]
    assert len({full.png(), half.png(), base[0]}) == 3
    assert 'Adapters: "tiny:1.0"' in png_text(full.png())
    assert pngs(sd.run_generate(gen(), noop)) == base
    assert pngs(sd.run_generate(gen(adapters=[AdapterRef(name="tiny")]), noop)) == [full.png()]


def test_lora_lru_evicts_and_reloads(sd: DiffusionPredictor, base: list[bytes]) -> None:
    first = pngs(sd.run_generate(gen(adapters=[AdapterRef(name="tiny")]), noop))
    assert sd.loaded_adapters == ["tiny"]
    second = pngs(sd.run_generate(gen(adapters=[AdapterRef(name="tiny.two")]), noop))
    assert sd.loaded_adapters == ["tiny.two"] and second != first
    both = [AdapterRef(name="tiny"), AdapterRef(name="tiny.two", scale=0.5)]
    assert pngs(sd.run_generate(gen(adapters=both), noop)) not in (first, second)
    assert pngs(sd.run_generate(gen(adapters=[AdapterRef(name="tiny")]), noop)) == first
    assert sd.loaded_adapters == ["tiny"]
    assert pngs(sd.run_generate(gen(), noop)) == base


def test_a_republished_adapter_is_reloaded(
    sd: DiffusionPredictor, registry: dict[str, Path]
) -> None:
    def raw(name: str) -> bytes:  # pixels only: the PNG text names the adapter
        png = sd.run_generate(gen(adapters=[AdapterRef(name=name)]), noop)[0].png()
        return Image.open(io.BytesIO(png)).tobytes()

    tiny, two = raw("tiny"), raw("tiny.two")
    assert raw("pub") == tiny
    weights = registry["pub"] / LORA_WEIGHT_NAME
    shutil.copy(registry["tiny.two"] / LORA_WEIGHT_NAME, weights)
    stat = weights.stat()  # a later mtime even on coarse-grained filesystems
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert raw("pub") == two


def test_unknown_or_repeated_adapter_is_invalid(sd: DiffusionPredictor) -> None:
    with pytest.raises(InvalidInput, match="unknown adapter 'nope'"):
        sd.run_generate(gen(adapters=[AdapterRef(name="nope")]), noop)
    with pytest.raises(InvalidInput, match="listed twice"):
        sd.run_generate(gen(adapters=[AdapterRef(name="tiny"), AdapterRef(name="tiny")]), noop)


def test_a_job_failing_on_its_second_adapter_leaves_the_first_off(
    tiny_sd_model: Path, registry: dict[str, Path], base: list[bytes]
) -> None:
    fresh = next(make(tiny_sd_model, adapter_path=registry.__getitem__, warm_up=False))
    with pytest.raises(InvalidInput, match="unknown adapter 'nope'"):
        fresh.run_generate(gen(adapters=[AdapterRef(name="tiny"), AdapterRef(name="nope")]), noop)
    assert fresh.loaded_adapters == ["tiny"]
    assert pngs(fresh.run_generate(gen(), noop)) == base


def test_batch_key_groups_compatible_jobs(sd: DiffusionPredictor) -> None:
    def key_of(inp: GenerateInput) -> Any:
        return sd.batch_key(GenerateJob(inp, noop))

    key = key_of(gen())
    assert key_of(gen(prompt="x", negative_prompt="y", seed=9, num_images=3)) == key
    for other in (gen(width=72), gen(steps=3), gen(scheduler="ddim"), gen(guidance_scale=2.0)):
        assert key_of(other) != key
    assert key_of(gen(adapters=[AdapterRef(name="tiny")])) != key


def test_batched_jobs_get_exactly_their_own_images(sd: DiffusionPredictor) -> None:
    # Pixels within one level, not bytes: whether a layout is byte-exact depends on the
    # CPU's GEMM kernels (exact on one test machine, not on an AVX2-only EPYC). The
    # prompts differ enough that an image handed to the wrong job differs everywhere.
    jobs = [
        gen(prompt="a cat", negative_prompt="ugly", seed=10, num_images=2),
        gen(prompt="the dog", seed=20, num_images=2),
        gen(prompt="a red cat on a log", seed=30, num_images=3),
    ]
    alone = [sd.run_generate(job, noop) for job in jobs]
    recorders = [Recorder() for _ in jobs]
    batched = sd.predict([GenerateJob(job, r) for job, r in zip(jobs, recorders, strict=True)])
    assert [[im.seed for im in images] for images in batched] == [[10, 11], [20, 21], [30, 31, 32]]
    assert [[im.parameters for im in images] for images in batched] == [
        [im.parameters for im in images] for images in alone
    ]
    for own, lone in zip(batched, alone, strict=True):
        for a, b in zip(own, lone, strict=True):
            diff = np.abs(pixels(a) - pixels(b))
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert np.abs(pixels(batched[0][0]) - pixels(alone[1][0])).mean() > 10
    assert all([s for s, _, _ in r.calls] == [1, 2, 3] for r in recorders)


def test_batched_single_images_match_within_rounding(sd: DiffusionPredictor) -> None:
    jobs = [gen(prompt="a cat", seed=40), gen(prompt="the dog", seed=41)]
    alone = [sd.run_generate(job, noop)[0] for job in jobs]
    batched = [images[0] for images in sd.predict([GenerateJob(job, noop) for job in jobs])]
    for a, b in zip(alone, batched, strict=True):
        diff = np.abs(pixels(a) - pixels(b))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_cancel_in_a_batch_names_the_job(sd: DiffusionPredictor, base: list[bytes]) -> None:
    jobs = [gen(seed=1), gen(prompt="the dog", seed=2)]
    with pytest.raises(BatchInterrupted) as info:
        sd.predict([GenerateJob(jobs[0], Recorder()), GenerateJob(jobs[1], Recorder(stop_at=2))])
    assert info.value.index == 1 and isinstance(info.value.error, Canceled)
    assert pngs(sd.run_generate(gen(), noop)) == base
    with pytest.raises(ValueError, match="batch_key"):
        sd.predict([GenerateJob(gen(), noop), GenerateJob(gen(steps=3), noop)])


class _Exploding:
    """Delegates to a pipeline but fails when called."""

    def __init__(self, pipe: Any, error: BaseException) -> None:
        self.__dict__.update(pipe=pipe, error=error)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.pipe, name, value)

    def __call__(self, **kwargs: Any) -> Any:
        raise self.error


def test_errors_map_to_out_of_memory_and_model_error(
    sd: DiffusionPredictor, base: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    pipe = sd._pipe
    monkeypatch.setattr(sd, "_pipe", _Exploding(pipe, torch.cuda.OutOfMemoryError("CUDA oom")))
    with pytest.raises(OutOfMemory):
        sd.run_generate(gen(), noop)
    monkeypatch.setattr(sd, "_pipe", _Exploding(pipe, RuntimeError("boom")))
    with pytest.raises(ModelError, match="RuntimeError: boom"):
        sd.run_generate(gen(), noop)
    monkeypatch.setattr(sd, "_pipe", pipe)
    assert pngs(sd.run_generate(gen(), noop)) == base


def test_predict_serves_the_predictor_protocol(sd: DiffusionPredictor, base: list[bytes]) -> None:
    assert isinstance(sd, BatchedPredictor)
    out = sd.predict([GenerateJob(gen(), noop), GenerateJob(gen(prompt="the dog", seed=2), noop)])
    assert len(out) == 2 and all(isinstance(images[0], GeneratedImage) for images in out)
    # A lone job's callback error is its own, not a BatchInterrupted.
    with pytest.raises(Canceled):
        sd.predict([GenerateJob(gen(), Recorder(stop_at=1))])


def test_setup_failure_is_a_model_error(tmp_path: Path) -> None:
    predictor = DiffusionPredictor(str(tmp_path / "missing"), settings=Settings())
    with pytest.raises(ModelError, match="cannot load"):
        predictor.setup("cpu")
