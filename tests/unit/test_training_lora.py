"""The two LoRA trainers on tiny models: the loss falls, and the exported adapter is what the
serving side loads (the caption predictor, diffusers' ``load_lora_weights``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from imageq.api_client.inputs import GenerationOptions
from imageq.api_client.settings import Settings
from imageq.workers.io.storage import LocalStorage
from imageq.workers.predictors.caption import CaptionItem, CaptionPredictor
from imageq.workers.training.checkpoints import CheckpointStore
from imageq.workers.training.datasets import Dataset, read_dataset
from imageq.workers.training.loop import LoopConfig, LoopResult, Trainer, run_training
from imageq.workers.training.lora_caption import CaptionTrainer
from imageq.workers.training.lora_diffusion import LORA_WEIGHT_NAME, DiffusionTrainer

COLORS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (220, 220, 30)]
TEXTS = ["zebra zebra on the beach", "a red bus near a tree", "two dogs in snow", "a cat"]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    root = tmp_path_factory.mktemp("pairs")
    lines = []
    for i, (color, text) in enumerate(zip(COLORS, TEXTS, strict=True)):
        Image.new("RGB", (72, 64), color).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": text}))
    (root / "metadata.jsonl").write_text("\n".join(lines))
    return read_dataset(root, Settings(), allow_missing_text=False)


def train(trainer: Trainer, tmp_path: Path, steps: int, lr: float) -> LoopResult:
    config = LoopConfig(
        max_steps=steps, batch_size=2, learning_rate=lr, checkpoint_every=steps, seed=0, examples=4
    )
    store = CheckpointStore(LocalStorage(tmp_path / "storage"), "ck/")
    seen: list[float] = []
    result = run_training(trainer, config, store, lambda s, t, extra: seen.append(extra["loss"]))
    assert len(seen) == steps
    return result


def mean(values: list[list[float]]) -> float:
    return sum(v for _, v in values) / len(values)


def test_caption_lora_learns_the_captions_and_serves_them(
    tiny_caption_model: Path, dataset: Dataset, tmp_path: Path
) -> None:
    settings = Settings(model_caption=str(tiny_caption_model))
    trainer = CaptionTrainer(settings, "cpu", dataset, rank=8, alpha=16)
    result = train(trainer, tmp_path, steps=60, lr=5e-3)
    assert result.curve[0][0] == 1 and result.curve[-1][0] == 60
    assert mean(result.curve[-5:]) < 0.8 * mean(result.curve[:5])

    folder = tmp_path / "adapter"
    folder.mkdir()
    for name, data in trainer.export().items():
        (folder / name).write_bytes(data)
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    predictor = CaptionPredictor(str(tiny_caption_model))
    predictor.setup("cpu")
    predictor.load_adapter("learned", folder)
    gen = GenerationOptions(max_new_tokens=12)
    image = Image.new("RGB", (72, 64), COLORS[0])
    before = predictor.predict([CaptionItem(image, None, gen)])[0].text
    after = predictor.predict([CaptionItem(image, None, gen, "learned")])[0].text
    assert after == TEXTS[0] != before


def test_diffusion_lora_loss_falls_and_loads_in_diffusers(
    tiny_sd_model: Path, dataset: Dataset, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    settings = Settings(model_diffusion=str(tiny_sd_model))
    trainer = DiffusionTrainer(settings, "cpu", dataset, rank=4, alpha=8, resolution=64)
    assert trainer.means.shape == (4, 4, 8, 8)  # latents cached once, at 64 px / 8
    result = train(trainer, tmp_path, steps=60, lr=5e-3)
    assert mean(result.curve[-6:]) < 0.95 * mean(result.curve[:6])

    folder = tmp_path / "lora"
    folder.mkdir()
    files = trainer.export()
    assert list(files) == [LORA_WEIGHT_NAME]
    (folder / LORA_WEIGHT_NAME).write_bytes(files[LORA_WEIGHT_NAME])
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_model), safety_checker=None)
    noisy, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), trainer.embeds[:1]
    trainer.unet.eval()
    with torch.no_grad():
        trained = trainer.unet(noisy, t, text).sample
        base = pipe.unet(noisy, t, text).sample
        pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHT_NAME, adapter_name="x")
        loaded = pipe.unet(noisy, t, text).sample
    # alpha != rank: the scale travels in the file's metadata.
    assert torch.allclose(loaded, trained, atol=1e-5)
    assert not torch.allclose(base, trained, atol=1e-3)
