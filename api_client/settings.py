"""The one place imageq reads its environment.

Every entry point builds one ``Settings`` with ``Settings.from_env()`` and passes it
down; no other module looks at ``os.environ``. Names carry their units. Each field is
the variable ``IMAGEQ_<FIELD_NAME>``; a value that does not parse stops the process at
start with a ``SettingsError`` naming the variable and what it expects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from imageq.api_client.kinds import WORKER_KIND_SPECS

ENV_PREFIX = "IMAGEQ_"

DEFAULT_MODELS = {
    "caption": "Salesforce/blip-image-captioning-base",
    "match": "Salesforce/blip-itm-base-coco",
    "diffusion": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "inpaint": "stable-diffusion-v1-5/stable-diffusion-inpainting",
}

# Standard Webhooks recommends roughly this schedule; tests shorten it by a setting.
DEFAULT_WEBHOOK_SCHEDULE_S = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)

# Masked by public_view() and never echoed in an error message.
SECRET_FIELDS = frozenset(
    {"webhook_secret", "webhook_extra_secrets", "flower_basic_auth", "id_secret"}
)

# What each pydantic error type means to someone editing an environment file.
_EXPECTED = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "finite_number": "a number",
    "bool_parsing": "a boolean (1/0, true/false, yes/no, on/off)",
    "bool_type": "a boolean (1/0, true/false, yes/no, on/off)",
    "string_type": "a string",
    "tuple_type": "a comma-separated list",
}


class SettingsError(ValueError):
    """Settings that do not parse; the message names each bad variable."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings: " + "; ".join(problems))


def _comma_separated(value: Any) -> Any:
    # Environment lists are "a,b,c" (NoDecode keeps pydantic-settings from reading them
    # as JSON); empty items are skipped, so a trailing comma is harmless.
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class _GivenEnvironment(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping, not ``os.environ``.

    ``from_env(env)`` must see exactly ``env``: tests and launchers pass the environment
    a process will have, and nothing of the calling process may leak into it.
    """

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        # Before super().__init__, which loads the variables.
        self._given = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # Names match case-insensitively (the config's default), as pydantic-settings
        # matches os.environ; an empty value means "not set" (env_ignore_empty).
        return {k.lower(): v for k, v in self._given.items() if v != ""}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_ignore_empty=True,
        frozen=True,
        extra="forbid",
    )

    broker_url: str = "redis://localhost:6379/0"
    # Job records live beside the broker unless a deployment separates them.
    records_url: str = ""
    # Long jobs (finetune) get their own Redis database with a long visibility timeout.
    finetune_broker_url: str = ""
    #: A local folder (an absolute path, or one under the home folder: ``file://~/...``)
    #: or ``s3://bucket/prefix``. Never relative to the working directory: a CLI and
    #: workers started in different folders would each use their own.
    storage_url: str = "file://~/imageq-data"
    webhook_secret: SecretStr = SecretStr("")
    # Rotation: signatures are made with every secret listed here too.
    webhook_extra_secrets: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    # Keys the ids of tenant jobs made from idempotency keys (HMAC-SHA256), so no one
    # without it can compute another tenant's job ids. Empty: one is generated once and
    # kept in Redis beside the records (api_client/job_ids.py); every producer of the
    # deployment must see the same one.
    id_secret: SecretStr = SecretStr("")
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
    flower_basic_auth: SecretStr = SecretStr("")
    result_ttl_s: int = 7 * 24 * 3600
    # Model time per tenant, kind and day (api_client/usage.py) is kept this long: a
    # year and a month, so a yearly invoice can still be checked. A tenant-day is one
    # small hash.
    usage_keep_days: int = 400
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
    max_attempts: int = 3
    lease_ttl_s: float = 30.0
    heartbeat_interval_s: float = 5.0
    # How often every worker looks for running jobs whose lease lapsed (their worker
    # died) and re-sends them; the visibility timeout is only the backstop.
    failover_scan_s: float = 5.0
    # How long a second delivery waits before it looks at a live lease again.
    lease_wait_s: float = 10.0
    # Caption and match: images in one forward pass. Unless this is set, a worker
    # measures at warm-up which size feeds its device best (batch_tuning) and uses that;
    # this value is then only the size when tuning is off.
    max_batch_images: int = 32
    max_batch_wait_ms: int = 10
    # The warm-up measurement: on or off, the largest size tried, its time budget (it
    # stops early past the knee of the curve), and the caption length it measures with.
    batch_tuning: bool = True
    batch_tuning_max_images: int = 256
    batch_tuning_budget_s: float = 120.0
    batch_tuning_tokens: int = 20
    max_image_bytes: int = 20 * 1024 * 1024
    max_data_uri_bytes: int = 256 * 1024
    max_image_pixels: int = 40_000_000
    # Decoded pixels one job's images may add up to, read from their headers before any
    # is decoded. max_image_pixels bounds one image; without a job budget, one 33 KB PNG
    # of 6000 x 6000 named 512 times made a caption worker decode 18 Gpx (~60 GB of RGB)
    # and be OOM-killed, and redelivery then killed the next worker. 256 Mpx still takes
    # 512 web images of 0.5 Mpx, or 21 twelve-megapixel phone photos, and bounds a job's
    # decoding to ~768 MB of RGB and seconds of CPU (workers decode one image at a time
    # and keep a reduced copy, so the memory held is far less: docs/reliability.md).
    max_job_pixels: int = 256_000_000
    fetch_timeout_s: float = 20.0
    max_redirects: int = 3
    webhook_schedule_s: Annotated[tuple[float, ...], NoDecode] = DEFAULT_WEBHOOK_SCHEDULE_S
    webhook_timeout_s: float = 10.0
    webhook_jitter: float = 0.1
    progress_webhook_interval_s: float = 2.0
    # Deliveries that failed for good (retries spent, or 410) are kept this long, at most
    # this many, for `imageq webhooks list` and `replay`.
    webhook_keep_s: int = 7 * 24 * 3600
    webhook_keep_max: int = 100_000
    # Storage trouble, one layer per concern. One S3 request: botocore's standard retry
    # mode makes this many attempts beyond the first (its own short, jittered backoff).
    # A job whose storage call still failed: deferred and re-run this many times, the
    # first after storage_retry_base_s, doubling (the job layer), then failed.
    storage_retries: int = 4
    storage_retry_base_s: float = 0.5
    presign_ttl_s: int = 7 * 24 * 3600
    # Set by the worker launcher for the Celery process it starts.
    worker_kind: str = ""
    device: str = "auto"
    worker_name: str = ""
    # Jobs in flight given with --concurrency; 0: imageq sizes the pool (launch.pool_size),
    # for a batching kind from the batch size it measured.
    worker_concurrency: int = 0
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
    # Diffusion step previews (docs/diffusion.md "Previews"): a JPEG of a job's current
    # latents at most this often, like Replicate's 500 ms output events; off for every job
    # with previews=false. preview_decoder: a local AutoencoderTiny (TAESD) directory;
    # empty: the fixed linear latent-to-RGB map (no weights, about 1 ms a preview).
    previews: bool = True
    preview_interval_ms: int = 500
    preview_decoder: str = ""
    # LoRA adapters kept loaded in a diffusion worker's pipeline (an LRU).
    max_loaded_adapters: int = 4
    # Where workers keep downloaded adapters; empty: a temporary folder per worker.
    adapter_cache_dir: str = ""
    # Diffusion outputs' C2PA manifests (docs/design.md "Provenance"): the signing
    # certificate chain (PEM, end-entity first) and its private key (PEM) as file paths;
    # empty: outputs are unsigned (XMP source type only) and the worker warns at start.
    provenance_cert: str = ""
    provenance_key: str = ""
    # An RFC 3161 timestamp authority: signatures then outlive the certificate.
    provenance_tsa_url: str = ""
    # The job's parameters (prompt, seed, steps...) in the manifest; off keeps prompts private.
    provenance_parameters: bool = True
    log_level: str = "INFO"
    # The HTTP gateway (`imageq gateway`, docs/design.md "HTTP gateway"). Caps on what a
    # request may carry and how long it may take; uploads are capped by max_image_bytes.
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8000
    gateway_max_body_bytes: int = 4 * 1024 * 1024
    gateway_max_header_bytes: int = 16 * 1024
    gateway_max_json_depth: int = 32
    gateway_request_timeout_s: float = 30.0
    # Prefer: wait=N holds a submit at most this long (Replicate's cap is 60 s too).
    gateway_max_wait_s: float = 60.0
    # An event stream closes after this long (an SSE client reconnects on its own).
    gateway_stream_max_s: float = 3600.0
    # Tenants made without --rate / --max-in-flight: jobs per second (burst: one
    # second's worth) and jobs not yet final; 0 means no limit.
    gateway_default_rate: float = 10.0
    gateway_default_max_in_flight: int = 100
    # Tenants made without --max-priority: the highest job priority they may ask for.
    gateway_default_max_priority: int = Field(default=5, ge=0, le=9)
    # Connections one gateway process serves at once; past it uvicorn answers 503.
    gateway_max_connections: int = 1000
    # An idle keep-alive connection, and one whose request head has not fully arrived
    # (a slowloris), is closed after this long.
    gateway_idle_timeout_s: int = 15
    # Peers whose X-Forwarded-For / -Proto are believed (comma-separated addresses or
    # networks, or *): the load balancer's. Anyone else's are ignored.
    gateway_forwarded_allow_ips: str = "127.0.0.1"
    # queue_position: queued messages looked at before the answer is "unknown" (null).
    gateway_queue_scan_max: int = 1000
    # A valid token is remembered this long: a revoked one works at most this long more.
    gateway_token_cache_s: float = 1.0
    # Threads that submit, cancel and list per gateway process (Redis round trips: a few
    # keep a core busy; more only contend for the GIL). Uploads have threads of their own.
    gateway_threads: int = 4
    # The OpenAI-compatible images API (/v1/images/*): the model names a client may send,
    # "alias" or "alias=adapter" (a LoRA adapter every job of that alias uses), comma
    # separated; the first is the default.
    gateway_openai_models: str = "imageq-sd"
    # An images call waits this long for its job, then answers 504 naming the job's id
    # (the job goes on: GET /v1/jobs/{id}). Tiny-model e2e jobs end in about a second;
    # 512x512 SD at 25 steps takes several seconds on a GPU, minutes on a CPU.
    gateway_openai_wait_s: float = 120.0

    @field_validator("storage_url")
    @classmethod
    def _storage_not_relative(cls, value: str) -> str:
        if value[:7].lower() == "file://":
            path = value[7:].split("?", 1)[0].split("#", 1)[0]
            path = path[len("localhost") :] if path.lower().startswith("localhost/") else path
            if not path.startswith(("/", "~")):
                raise ValueError(
                    f"{value!r} is relative to each process's working directory, so the CLI "
                    "and workers started in different folders would use different folders: "
                    "give an absolute path (file:///srv/imageq-data) or one under the home "
                    "folder (file://~/imageq-data)"
                )
        return value

    @field_validator("webhook_extra_secrets", "webhook_schedule_s", mode="before")
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        return _comma_separated(value)

    @field_validator("*", mode="before")
    @classmethod
    def _strip_flags(cls, value: Any, info: ValidationInfo) -> Any:
        # " true " was on before pydantic parsed the flags; keep it on.
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and field.annotation is bool and isinstance(value, str):
            return value.strip()
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Settings(...) in code is exactly what it says (tests rely on the defaults);
        # the environment is read by from_env() alone, from the mapping it is given.
        return (init_settings,)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``IMAGEQ_*`` variables (``env`` defaults to the process's).

        ``overrides`` (field names) win over the environment. Raises ``SettingsError``
        naming every variable whose value does not parse.
        """
        given = _GivenEnvironment(cls, os.environ if env is None else env)()
        from_environment = {ENV_PREFIX + name.upper() for name in given if name not in overrides}
        return cls._build({**given, **overrides}, from_environment)

    @classmethod
    def _build(cls, values: dict[str, Any], from_environment: set[str]) -> Settings:
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = [_problem(error, from_environment) for error in exc.errors()]
            raise SettingsError(problems) from None

    def with_(self, **changes: Any) -> Settings:
        """A copy with ``changes`` (field names), validated like the original; a field
        left at its default stays unset (``is_set``)."""
        given = {name: getattr(self, name) for name in self.model_fields_set}
        return self._build({**given, **changes}, set())

    def is_set(self, name: str) -> bool:
        """Whether field ``name`` was given (a variable, an override), not defaulted:
        some defaults mean "decide for me" (``max_batch_images``: tune it)."""
        return name in self.model_fields_set

    @property
    def records_redis_url(self) -> str:
        return self.records_url or self.broker_url

    @property
    def long_broker_url(self) -> str:
        return self.finetune_broker_url or self.broker_url

    def model_for(self, worker_kind: str) -> str:
        """The model a worker kind loads (its ``WorkerKind.model_setting``); "" for none."""
        spec = WORKER_KIND_SPECS.get(worker_kind)
        if spec is None or not spec.model_setting:
            return ""
        return str(getattr(self, spec.model_setting))

    def public_view(self) -> dict[str, Any]:
        """Settings safe to log: secrets and credentials masked."""
        out: dict[str, Any] = {}
        for name, value in self:
            if name in SECRET_FIELDS:
                value = "***" if value else ""
            elif isinstance(value, str) and "@" in value and "://" in value:
                scheme, rest = value.split("://", 1)
                value = scheme + "://***@" + rest.rsplit("@", 1)[1]
            out[name] = value
        return out


def _problem(error: ErrorDetails, from_environment: set[str]) -> str:
    """One line for one validation error: the variable (or field), what it expects, what it got."""
    field = str(error["loc"][0]) if error["loc"] else "settings"
    variable = ENV_PREFIX + field.upper()
    where = variable if variable in from_environment else field
    if len(error["loc"]) > 1:
        where += f" (item {int(error['loc'][1]) + 1})"
    if error["type"] == "extra_forbidden":
        return f"{where}: no such setting"
    expected = _EXPECTED.get(error["type"], error["msg"][:1].lower() + error["msg"][1:])
    # A secret's value is never shown, not even a wrong one.
    got = "a hidden value" if field in SECRET_FIELDS else repr(error["input"])
    return f"{where}: expected {expected}, got {got}"


def process_environment() -> dict[str, str]:
    """A copy of this process's environment, for the child processes a launcher starts."""
    return dict(os.environ)


def is_configured(name: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether the user set ``IMAGEQ_<NAME>`` (as opposed to relying on its default)."""
    source = os.environ if env is None else env
    return bool(source.get(ENV_PREFIX + name.upper()))
