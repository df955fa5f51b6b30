"""Randomly initialised Stable Diffusion checkpoints, built offline.

Tests build tiny models of the real architectures (UNet2DConditionModel, AutoencoderKL,
CLIP text encoder and tokenizer, a PNDM scheduler) and save them with ``save_pretrained``
so that workers load them through the same ``from_pretrained`` path production uses.
GPU benchmarks use the full-size SD 1.5 configs below with random weights: the cost of a
forward pass depends on the architecture, not on the weights, and nothing is downloaded.

Nothing here runs at import time; torch, diffusers and transformers load on first call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Byte-level BPE merges for the tiny tokenizer: a handful is enough to exercise merging.
_TINY_MERGES = (("t", "h"), ("th", "e</w>"), ("a", "t</w>"), ("c", "at</w>"), ("o", "g</w>"))
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
IP_ADAPTER_WEIGHT_NAME = "ip-adapter_sd15.safetensors"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def sd15_unet_config(in_channels: int = 4) -> dict[str, Any]:
    """UNet2DConditionModel config of SD 1.5 (``in_channels=9`` for the inpainting one)."""
    return {
        "sample_size": 64,
        "in_channels": in_channels,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        "up_block_types": (
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
    }


def sd15_vae_config() -> dict[str, Any]:
    """AutoencoderKL config of SD 1.5 (8x downsampling, 4 latent channels)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
        "act_fn": "silu",
    }


def sd15_text_encoder_config() -> dict[str, Any]:
    """CLIPTextConfig kwargs of SD 1.5's text encoder (CLIP ViT-L/14)."""
    return {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    }


def sd15_scheduler_config() -> dict[str, Any]:
    """The PNDM scheduler SD 1.5 ships (``skip_prk_steps`` so that few steps work)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "clip_sample": False,
    }


def tiny_unet_config(in_channels: int = 4) -> dict[str, Any]:
    # Two resolution levels and one transformer block each: the real block types, tiny widths.
    return {
        "sample_size": 8,
        "in_channels": in_channels,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": (16, 32),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 2,
        "norm_num_groups": 8,
    }


def tiny_vae_config() -> dict[str, Any]:
    # Four levels keep SD's 8x latent downsampling, so size rules match production.
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (8, 8, 16, 16),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 64,
    }


def tiny_text_encoder_config(vocab_size: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "projection_dim": 32,
    }


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP's reversible map from bytes to printable characters (BPE works on these).
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def write_tiny_clip_tokenizer_files(directory: Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of a byte-level CLIP BPE with 256 byte tokens."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in [*chars, *(c + "</w>" for c in chars), *(a + b for a, b in _TINY_MERGES)]:
        vocab.setdefault(token, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = "\n".join(f"{a} {b}" for a, b in _TINY_MERGES)
    (directory / "merges.txt").write_text(f"#version: 0.2\n{merges}\n", encoding="utf-8")
    return directory


def build_diffusion(
    path: Path,
    *,
    unet_config: dict[str, Any],
    vae_config: dict[str, Any],
    text_config: dict[str, Any] | None = None,
    scheduler_config: dict[str, Any] | None = None,
    inpaint: bool = False,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised (inpainting) Stable Diffusion pipeline directory.

    ``text_config`` defaults to a tiny CLIP text encoder sized to the tiny tokenizer; a
    full-size config keeps its own vocabulary size (the tiny tokenizer's ids fit in it).
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    # Written where the pipeline keeps its tokenizer, as SD 1.5's repository has them.
    tokenizer = CLIPTokenizer.from_pretrained(
        str(write_tiny_clip_tokenizer_files(path / "tokenizer")), model_max_length=77
    )
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    text_kwargs = {**(text_config or tiny_text_encoder_config(len(tokenizer))), **special}
    # Seed each module separately so that changing one config leaves the others' weights.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**vae_config)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_kwargs))
    scheduler = PNDMScheduler.from_config(scheduler_config or sd15_scheduler_config())
    # Any: diffusers' lazy module confuses type checkers about the pipeline classes.
    pipeline_cls: Any = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    pipe = pipeline_cls(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


def build_tiny_diffusion(path: Path, seed: int = 0) -> Path:
    """A tiny StableDiffusionPipeline directory (64 px images take milliseconds on a CPU)."""
    return build_diffusion(
        path, unet_config=tiny_unet_config(), vae_config=tiny_vae_config(), seed=seed
    )


def build_tiny_inpaint(path: Path, seed: int = 0) -> Path:
    """A tiny inpainting checkpoint: a 9-channel UNet (latents + mask + masked image)."""
    return build_diffusion(
        path,
        unet_config=tiny_unet_config(in_channels=9),
        vae_config=tiny_vae_config(),
        inpaint=True,
        seed=seed,
    )


def build_sd15_random(path: Path, seed: int = 0, inpaint: bool = False) -> Path:
    """Full-size SD 1.5 with random weights (about 4 GiB in fp32) for GPU benchmarks."""
    return build_diffusion(
        path,
        unet_config=sd15_unet_config(in_channels=9 if inpaint else 4),
        vae_config=sd15_vae_config(),
        text_config=sd15_text_encoder_config(),
        inpaint=inpaint,
        seed=seed,
    )


def build_tiny_ip_adapter(path: Path, pipeline_dir: Path, seed: int = 0) -> Path:
    """Tiny IP-Adapter weights for the UNet in ``pipeline_dir``, with an image encoder.

    Layout (the one h94/IP-Adapter's ``models/`` folder has)::

        path/ip-adapter_sd15.safetensors   "image_proj.*" and "ip_adapter.*" tensors
        path/image_encoder/                a CLIPVisionModelWithProjection

    ``image_proj`` is diffusers' plain ``ImageProjection`` (4 image tokens):
    ``proj.weight`` is (4 * cross_attention_dim, projection_dim), plus ``proj.bias`` and a
    LayerNorm ``norm``. ``ip_adapter`` holds ``{k}.to_k_ip.weight`` / ``{k}.to_v_ip.weight``
    (hidden_size, cross_attention_dim) for each cross-attention processor in
    ``unet.attn_processors`` order, numbered k = 1, 3, 5, ... (the self-attention
    processors take the even numbers in the original checkpoints).
    """
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(str(pipeline_dir), subfolder="unet")
    cross_dim = int(unet.config.cross_attention_dim)
    widths = list(unet.config.block_out_channels)
    projection_dim = 32

    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=projection_dim,
        )
    )
    encoder.save_pretrained(str(path / "image_encoder"), safe_serialization=True)

    generator = torch.Generator().manual_seed(seed + 1)

    def rand(*shape: int, std: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    tensors = {
        "image_proj.proj.weight": rand(4 * cross_dim, projection_dim),
        "image_proj.proj.bias": rand(4 * cross_dim),
        "image_proj.norm.weight": torch.ones(cross_dim),
        "image_proj.norm.bias": torch.zeros(cross_dim),
    }
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = widths[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(widths))[int(name.split(".")[1])]
        else:
            hidden = widths[int(name.split(".")[1])]
        tensors[f"ip_adapter.{key_id}.to_k_ip.weight"] = rand(hidden, cross_dim)
        tensors[f"ip_adapter.{key_id}.to_v_ip.weight"] = rand(hidden, cross_dim)
        key_id += 2
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / IP_ADAPTER_WEIGHT_NAME))
    return path


def build_tiny_lora(path: Path, pipeline_dir: Path, seed: int = 1, rank: int = 4) -> Path:
    """A random (nonzero) LoRA for the UNet in ``pipeline_dir``.

    Saved the way diffusers' LoRA training scripts save theirs, as
    ``pytorch_lora_weights.safetensors`` with ``unet.``-prefixed keys, so it loads with
    ``pipe.load_lora_weights(path, adapter_name=...)``.
    """
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    path = Path(path)
    unet = UNet2DConditionModel.from_pretrained(str(pipeline_dir), subfolder="unet")
    torch.manual_seed(seed)
    # init_lora_weights=False draws lora_B at random too (the default zeroes it: a no-op).
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            init_lora_weights=False,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(path),
        unet_lora_layers=layers,
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
    )
    return path


def build_tiny_taesd(path: Path, seed: int = 0) -> Path:
    """A randomly initialised ``AutoencoderTiny`` (TAESD's architecture, tiny widths) with
    SD's 8x upsampling, saved with ``save_pretrained``: a preview decoder for tests."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    # Any: diffusers' stubs hide ModelMixin.save_pretrained from mypy on this class.
    model: Any = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    )
    model.save_pretrained(str(path), safe_serialization=True)
    return path
