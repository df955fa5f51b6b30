"""Training loads its base models from safetensors only, as the serving workers do.

The tiny checkpoints converted to pickles (``*.bin``, proven loadable when pickles are
allowed) are refused with a ``ModelError`` that names safetensors, before any weight
from a pickle is read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from imageq.api_client.errors import ModelError
from imageq.api_client.settings import Settings
from imageq.workers.training.datasets import Dataset, read_dataset

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def pickled_copy(source: Path, target: Path) -> Path:
    """``source`` with every ``*.safetensors`` file replaced by a ``torch.save`` pickle."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(source, target)
    for weights in target.rglob("*.safetensors"):
        name = "pytorch_model.bin" if weights.name == "model.safetensors" else weights.stem + ".bin"
        torch.save(load_file(weights), weights.with_name(name))
        weights.unlink()
    return target


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    root = tmp_path_factory.mktemp("pairs")
    lines = []
    for i, color in enumerate([(230, 20, 20), (20, 230, 20)]):
        Image.new("RGB", (64, 64), color).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"colour {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines))
    return read_dataset(root, Settings(), allow_missing_text=False)


def test_a_pickled_diffusion_checkpoint_is_refused(
    tiny_sd_model: Path, dataset: Dataset, tmp_path: Path
) -> None:
    from diffusers import UNet2DConditionModel

    from imageq.workers.training.lora_diffusion import DiffusionTrainer

    pickled = pickled_copy(tiny_sd_model, tmp_path / "sd")
    # Not vacuous: the pickles are a loadable checkpoint when pickles are allowed.
    UNet2DConditionModel.from_pretrained(pickled, subfolder="unet", use_safetensors=False)
    settings = Settings(model_diffusion=str(pickled))
    with pytest.raises(ModelError, match="safetensors") as caught:
        DiffusionTrainer(settings, "cpu", dataset, rank=4, alpha=8, resolution=64)
    assert str(pickled) in caught.value.message


def test_a_pickled_caption_checkpoint_is_refused(
    tiny_caption_model: Path, dataset: Dataset, tmp_path: Path
) -> None:
    from transformers import BlipForConditionalGeneration

    from imageq.workers.training.lora_caption import CaptionTrainer

    pickled = pickled_copy(tiny_caption_model, tmp_path / "blip")
    BlipForConditionalGeneration.from_pretrained(pickled, use_safetensors=False)
    settings = Settings(model_caption=str(pickled))
    with pytest.raises(ModelError, match="safetensors") as caught:
        CaptionTrainer(settings, "cpu", dataset, rank=4, alpha=8)
    assert str(pickled) in caught.value.message
