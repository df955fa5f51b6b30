"""LoRA on the Stable Diffusion UNet: the denoising (epsilon or v) MSE loss.

The VAE and the text encoder are frozen, so every image's latent distribution and every
caption's embedding are computed once before the first step, and both models are freed
before training. Each step samples latents from the cached distributions, noise and
timesteps, as diffusers' ``train_text_to_image_lora.py`` does. The adapter is saved as
``pytorch_lora_weights.safetensors`` (diffusers' format, with its LoRA config in the
metadata so that ``alpha`` survives), which ``load_lora_weights`` reads.
"""

from __future__ import annotations

import tempfile
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from imageq.api_client.errors import ModelError
from imageq.api_client.settings import Settings
from imageq.workers.training.datasets import Dataset
from imageq.workers.training.loop import lora_config

if TYPE_CHECKING:
    import torch

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
_ENCODE_CHUNK = 8


def square_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and cut the centre square."""
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize(
        (max(size, round(width * scale)), max(size, round(height * scale))),
        Image.Resampling.BICUBIC,
    )
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


class DiffusionTrainer:
    def __init__(
        self,
        settings: Settings,
        device: str,
        dataset: Dataset,
        *,
        rank: int,
        alpha: float,
        resolution: int,
    ) -> None:
        import torch
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from imageq.workers.predictors.caption import check_local_model

        self.device = device
        self.base_model = model = settings.model_diffusion
        check_local_model(model)
        half = settings.half_precision and device.startswith("cuda")
        bf16 = half and torch.cuda.is_bf16_supported()
        self.dtype = torch.bfloat16 if bf16 else torch.float16 if half else torch.float32
        try:
            dtype = self.dtype
            # safetensors only, as the serving workers load: a pickled checkpoint could run
            # code while it loads, and a base model is data this process must not trust.
            unet = UNet2DConditionModel.from_pretrained(
                model, subfolder="unet", torch_dtype=dtype, use_safetensors=True
            )
            vae = AutoencoderKL.from_pretrained(
                model, subfolder="vae", torch_dtype=dtype, use_safetensors=True
            )
            text_encoder = CLIPTextModel.from_pretrained(
                model, subfolder="text_encoder", dtype=dtype, use_safetensors=True
            )
            tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
            self.noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
        except Exception as exc:
            raise ModelError(
                f"cannot load diffusion model {model!r} "
                f"(training loads safetensors weights only): {exc}"
            ) from exc
        if resolution % (2 ** (len(vae.config.block_out_channels) - 1)):
            raise ModelError(f"resolution {resolution} does not fit the VAE's downsampling")
        # Any: transformers annotates PreTrainedModel.to in a way mypy cannot call.
        frozen: tuple[Any, ...] = (unet, vae, text_encoder)
        for module in frozen:
            module.requires_grad_(False)
            module.to(device)
        self.scaling = float(vae.config.scaling_factor)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.means, self.stds = self._encode_images(vae, dataset, settings, resolution)
        self.embeds = self._encode_texts(text_encoder, tokenizer, dataset)
        del vae, text_encoder
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        unet.add_adapter(lora_config(rank, alpha, TARGET_MODULES, init_lora_weights="gaussian"))
        # The frozen weights stay in half precision; the LoRA weights train in float32.
        for param in unet.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        unet.train()
        self.unet = unet

    def _autocast(self) -> AbstractContextManager[Any]:
        import torch

        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.dtype)

    def _encode_images(
        self, vae: Any, dataset: Dataset, settings: Settings, resolution: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        import numpy as np
        import torch

        means, stds = [], []
        examples = list(dataset.examples)
        with torch.inference_mode():
            for i in range(0, len(examples), _ENCODE_CHUNK):
                pixels = torch.stack(
                    [
                        torch.from_numpy(
                            np.array(square_crop(e.load(settings), resolution), dtype=np.float32)
                        ).permute(2, 0, 1)
                        / 127.5
                        - 1.0
                        for e in examples[i : i + _ENCODE_CHUNK]
                    ]
                ).to(self.device, self.dtype)
                dist = vae.encode(pixels).latent_dist
                means.append(dist.mean.float())
                stds.append(dist.std.float())
        return torch.cat(means), torch.cat(stds)

    def _encode_texts(self, text_encoder: Any, tokenizer: Any, dataset: Dataset) -> torch.Tensor:
        import torch

        texts = [e.text or "" for e in dataset.examples]
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(texts), _ENCODE_CHUNK):
                ids = tokenizer(
                    texts[i : i + _ENCODE_CHUNK],
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids.to(self.device)
                chunks.append(text_encoder(ids)[0])
        return torch.cat(chunks)

    # -- Trainer ------------------------------------------------------------------------
    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.unet.named_parameters() if p.requires_grad]

    def loss(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        import torch
        from torch.nn.functional import mse_loss

        index = torch.tensor(indices, device=self.device)
        mean, std = self.means[index], self.stds[index]
        # Drawn on the CPU generator, so the stream is the same on every device.
        sample = torch.randn(mean.shape, generator=generator).to(self.device)
        latents = (mean + std * sample) * self.scaling
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(indices),), generator=generator).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        with self._autocast():
            pred = self.unet(noisy.to(self.dtype), timesteps, self.embeds[index]).sample
        return mse_loss(pred.float(), target.float())

    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return dict(get_peft_model_state_dict(self.unet))

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result: Any = set_peft_model_state_dict(self.unet, state)
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if getattr(result, "unexpected_keys", None) or missing:
            raise ModelError("the checkpoint's adapter does not fit this model")

    def export(self) -> dict[str, bytes]:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        with tempfile.TemporaryDirectory(prefix="imageq-unet-lora-") as tmp:
            StableDiffusionPipeline.save_lora_weights(
                save_directory=tmp,
                unet_lora_layers={k: v.float() for k, v in layers.items()},
                weight_name=LORA_WEIGHT_NAME,
                safe_serialization=True,
                unet_lora_adapter_metadata=self.unet.peft_config["default"].to_dict(),
            )
            return {LORA_WEIGHT_NAME: (Path(tmp) / LORA_WEIGHT_NAME).read_bytes()}
