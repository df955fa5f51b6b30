"""The one place imageq reads its environment.

Every entry point builds one ``Settings`` with ``Settings.from_env()`` and passes it
down; no other module looks at ``os.environ``. Names carry their units.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

DEFAULT_MODELS = {
    "caption": "Salesforce/blip-image-captioning-base",
    "match": "Salesforce/blip-itm-base-coco",
    "diffusion": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "inpaint": "stable-diffusion-v1-5/stable-diffusion-inpainting",
}

# Standard Webhooks recommends roughly this schedule; tests shorten it by a setting.
DEFAULT_WEBHOOK_SCHEDULE_S = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


def _flag(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _floats(value: str) -> tuple[float, ...]:
    return tuple(float(part) for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class Settings:
    broker_url: str = "redis://localhost:6379/0"
    # Job records live beside the broker unless a deployment separates them.
    records_url: str = ""
    # Long jobs (finetune) get their own Redis database with a long visibility timeout.
    finetune_broker_url: str = ""
    storage_url: str = "file://./imageq-data"
    webhook_secret: str = ""
    # Rotation: signatures are made with every secret listed here too.
    webhook_extra_secrets: tuple[str, ...] = ()
    allow_private_urls: bool = False
    allow_local_files: bool = False
    model_caption: str = DEFAULT_MODELS["caption"]
    model_match: str = DEFAULT_MODELS["match"]
    model_diffusion: str = DEFAULT_MODELS["diffusion"]
    model_inpaint: str = DEFAULT_MODELS["inpaint"]
    ip_adapter: str = ""
    queue_prefix: str = ""
    metrics_port: int = 0
    # All interfaces so Prometheus can reach a container; tests use 127.0.0.1.
    metrics_address: str = "0.0.0.0"
    flower_basic_auth: str = ""
    result_ttl_s: int = 7 * 24 * 3600
    visibility_timeout_s: int = 3600
    finetune_visibility_timeout_s: int = 7 * 24 * 3600
    # Finetune: where a job unpacks its dataset; empty: a temporary folder.
    finetune_work_dir: str = ""
    # Finetune datasets: download cap (archive or prefix), unpacked cap, most files,
    # and the deadline of one archive download.
    max_dataset_bytes: int = 2 * 1024**3
    max_dataset_unpacked_bytes: int = 8 * 1024**3
    max_dataset_files: int = 100_000
    dataset_fetch_timeout_s: float = 900.0
    # Finetune: complete checkpoints kept per job (older ones are deleted).
    finetune_keep_checkpoints: int = 2
    # Finetune auto_caption: how long to wait for the caption jobs it enqueues.
    auto_caption_timeout_s: float = 3600.0
    max_attempts: int = 3
    lease_ttl_s: float = 30.0
    heartbeat_interval_s: float = 5.0
    # How long a second delivery waits before it looks at a live lease again.
    lease_wait_s: float = 10.0
    max_batch_images: int = 32
    max_batch_wait_ms: int = 10
    max_image_bytes: int = 20 * 1024 * 1024
    max_data_uri_bytes: int = 256 * 1024
    max_image_pixels: int = 40_000_000
    fetch_timeout_s: float = 20.0
    max_redirects: int = 3
    webhook_schedule_s: tuple[float, ...] = DEFAULT_WEBHOOK_SCHEDULE_S
    webhook_timeout_s: float = 10.0
    webhook_jitter: float = 0.1
    progress_webhook_interval_s: float = 2.0
    storage_retries: int = 4
    storage_retry_base_s: float = 0.5
    presign_ttl_s: int = 7 * 24 * 3600
    # Set by the worker launcher for the Celery process it starts.
    worker_kind: str = ""
    device: str = "auto"
    worker_name: str = ""
    half_precision: bool = True
    # Caption and match models: auto (fp16 on CUDA when half_precision, else fp32),
    # fp32, fp16 or bf16; channels-last pixels and torch.compile of the vision encoder.
    dtype: str = "auto"
    channels_last: bool = False
    torch_compile: bool = False
    safety_checker: bool = False
    # Diffusion: the largest output (width x height), checked before any GPU work.
    max_output_pixels: int = 1024 * 1024
    # Diffusion: images in one batched pipeline call (compatible generate jobs summed).
    max_diffusion_batch_images: int = 8
    # Diffusion and inpaint workers: jobs in flight (waiting ones can join a batch).
    diffusion_concurrency: int = 4
    # LoRA adapters kept loaded in a diffusion worker's pipeline (an LRU).
    max_loaded_adapters: int = 4
    # Where workers keep downloaded adapters; empty: a temporary folder per worker.
    adapter_cache_dir: str = ""
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``IMAGEQ_*`` variables (``env`` defaults to the process's)."""
        source = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = source.get("IMAGEQ_" + f.name.upper())
            if raw is None or raw == "":
                continue
            default = f.default
            if isinstance(default, bool):
                values[f.name] = _flag(raw)
            elif isinstance(default, int):
                values[f.name] = int(raw)
            elif isinstance(default, float):
                values[f.name] = float(raw)
            elif f.name == "webhook_schedule_s":
                values[f.name] = _floats(raw)
            elif f.name == "webhook_extra_secrets":
                values[f.name] = tuple(s.strip() for s in raw.split(",") if s.strip())
            else:
                values[f.name] = raw
        values.update(overrides)
        return cls(**values)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @property
    def records_redis_url(self) -> str:
        return self.records_url or self.broker_url

    @property
    def long_broker_url(self) -> str:
        return self.finetune_broker_url or self.broker_url

    def model_for(self, worker_kind: str) -> str:
        return {
            "caption": self.model_caption,
            "match": self.model_match,
            "diffusion": self.model_diffusion,
            "inpaint": self.model_inpaint,
            "finetune": self.model_diffusion,
        }.get(worker_kind, "")

    def public_view(self) -> dict[str, Any]:
        """Settings safe to log: secrets and credentials masked."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in {"webhook_secret", "webhook_extra_secrets", "flower_basic_auth"}:
                value = "***" if value else ""
            elif isinstance(value, str) and "@" in value and "://" in value:
                scheme, rest = value.split("://", 1)
                value = scheme + "://***@" + rest.rsplit("@", 1)[1]
            out[f.name] = value
        return out


def process_environment() -> dict[str, str]:
    """A copy of this process's environment, for the child processes a launcher starts."""
    return dict(os.environ)


def is_configured(name: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether the user set ``IMAGEQ_<NAME>`` (as opposed to relying on its default)."""
    source = os.environ if env is None else env
    return bool(source.get("IMAGEQ_" + name.upper()))
