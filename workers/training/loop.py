"""The training loop every target shares: steps, checkpoints, resume, progress, stop.

A trainer (``lora_caption``, ``lora_diffusion``) knows its model and its loss; this loop
owns everything a long job needs around it. Batches come from per-epoch permutations
derived from the seed alone, and the random state of noise, timesteps and dropout is
checkpointed, so a run resumed from a checkpoint takes exactly the steps an
uninterrupted run would have taken.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from imageq.api_client.errors import ModelError
from imageq.workers.predictors.base import model_errors
from imageq.workers.runtime.control import HandedBack
from imageq.workers.training.checkpoints import Checkpoint, CheckpointStore

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Called after every step: records progress and raises Canceled or JobTimeout to stop.
StepCallback = Callable[[int, int, dict[str, Any]], None]
# Called after each checkpoint with its step and manifest URI.
CheckpointCallback = Callable[[int, str], None]
# Asked after every step: should the run stop here and resume elsewhere (SIGTERM)?
StopRequested = Callable[[], bool]

MAX_GRAD_NORM = 1.0
WEIGHT_DECAY = 1e-2
# The loss curve kept in the output: about this many points, whatever max_steps is.
CURVE_POINTS = 50


class Trainer(Protocol):
    """One LoRA target: its trainable parameters, its loss, its adapter files."""

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The adapter's parameters by name, in a fixed order."""

    def loss(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        """The mean loss over the examples at ``indices`` (draws randomness from
        ``generator`` and, for dropout, the global torch RNG)."""

    def adapter_state(self) -> dict[str, torch.Tensor]: ...

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def export(self) -> dict[str, bytes]:
        """The adapter's files as the serving side loads them (safetensors + JSON)."""


@dataclass(frozen=True)
class LoopConfig:
    max_steps: int
    batch_size: int
    learning_rate: float
    checkpoint_every: int
    seed: int
    examples: int

    @property
    def warmup_steps(self) -> int:
        return min(100, self.max_steps // 20)


@dataclass
class LoopResult:
    steps: int
    first_loss: float | None
    final_loss: float | None
    #: The step the run started from (a checkpoint's), or None when it started at 0.
    resumed_from_step: int | None
    curve: list[list[float]] = field(default_factory=list)
    steps_run: int = 0
    train_s: float = 0.0
    samples_per_s: float | None = None
    checkpoints: list[int] = field(default_factory=list)


def lora_config(rank: int, alpha: float, targets: Sequence[str], **options: Any) -> Any:
    """A peft ``LoraConfig``; peft annotates ``lora_alpha`` as int, but scales by
    ``alpha / rank`` in floating point, and the job's ``alpha`` is a float."""
    from peft import LoraConfig

    settings: dict[str, Any] = {"r": rank, "lora_alpha": alpha, "target_modules": list(targets)}
    return LoraConfig(**settings, **options)


def batch_indices(step: int, batch_size: int, examples: int, seed: int) -> list[int]:
    """The examples of 1-based ``step``: consecutive slices of per-epoch permutations."""
    import torch

    start = (step - 1) * batch_size
    out: list[int] = []
    perms: dict[int, list[int]] = {}
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, examples)
        if epoch not in perms:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            perms[epoch] = torch.randperm(examples, generator=g).tolist()
        out.append(perms[epoch][offset])
    return out


def run_training(
    trainer: Trainer,
    config: LoopConfig,
    checkpoints: CheckpointStore,
    control: StepCallback,
    on_checkpoint: CheckpointCallback | None = None,
    stop_requested: StopRequested | None = None,
) -> LoopResult:
    """Train to ``config.max_steps``, starting from the newest complete checkpoint.

    When ``stop_requested`` says so (the worker is shutting down), the step just taken
    is checkpointed and ``HandedBack`` raised: another worker resumes from it, losing
    no step.
    """
    import torch

    named = trainer.trainable()
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=WEIGHT_DECAY)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    result = LoopResult(config.max_steps, None, None, None)

    checkpoint = checkpoints.latest()
    start = 0
    if checkpoint is not None and checkpoint.step <= config.max_steps:
        _restore(checkpoint, trainer, optimizer, scheduler, generator, result)
        start = result.resumed_from_step = checkpoint.step
        log.info("resuming from the checkpoint at step %d", start)
    every = max(1, config.max_steps // CURVE_POINTS)
    began = time.monotonic()
    for step in range(start + 1, config.max_steps + 1):
        indices = batch_indices(step, config.batch_size, config.examples, config.seed)
        with model_errors(f"step {step}", "; try a smaller batch_size or resolution"):
            loss = trainer.loss(indices, generator)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ModelError(
                    f"training diverged: the loss is {value} at step {step}; "
                    "try a lower learning_rate"
                )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if result.first_loss is None:
            result.first_loss = value
        result.final_loss = value
        if step % every == 0 or step in (1, config.max_steps):
            result.curve.append([step, round(value, 6)])
        result.steps_run += 1
        elapsed = time.monotonic() - began
        rate = result.steps_run / elapsed if elapsed > 0 else 0.0
        result.samples_per_s = round(rate * config.batch_size, 3)
        stop = stop_requested is not None and step < config.max_steps and stop_requested()
        if step % config.checkpoint_every == 0 or step == config.max_steps or stop:
            state = _state(optimizer, scheduler, result)
            uri = checkpoints.save(step, _tensors(trainer, optimizer, generator), state)
            result.checkpoints.append(step)
            if on_checkpoint is not None:
                on_checkpoint(step, uri)
        if stop:
            log.info("stopping at step %d (checkpoint saved) to resume elsewhere", step)
            raise HandedBack(f"the worker is shutting down; checkpoint saved at step {step}")
        eta = (config.max_steps - step) / rate if rate > 0 else None
        # After the checkpoint: a cancel at this step keeps what was just saved.
        control(
            step,
            config.max_steps,
            {
                "stage": "training",
                "loss": round(value, 6),
                "samples_per_s": result.samples_per_s,
                "eta_s": None if eta is None else round(eta, 1),
            },
        )
    result.train_s = round(time.monotonic() - began, 3)
    return result


# -- checkpoint contents ------------------------------------------------------------------


def _tensors(
    trainer: Trainer, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> dict[str, dict[str, torch.Tensor]]:
    import torch

    state = optimizer.state_dict()["state"]
    opt_tensors = {
        f"{index}.{key}": value
        for index, slots in state.items()
        for key, value in slots.items()
        if isinstance(value, torch.Tensor)
    }
    rng = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda.{i}"] = cuda_state
    return {"adapter": trainer.adapter_state(), "optimizer": opt_tensors, "rng": rng}


def _state(optimizer: torch.optim.Optimizer, scheduler: Any, result: LoopResult) -> dict[str, Any]:
    import torch

    opt = optimizer.state_dict()
    scalars = {
        f"{index}.{key}": value
        for index, slots in opt["state"].items()
        for key, value in slots.items()
        if not isinstance(value, torch.Tensor)
    }
    return {
        "optimizer": {"param_groups": _jsonable(opt["param_groups"]), "scalars": scalars},
        "scheduler": _jsonable(
            {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        ),
        "first_loss": result.first_loss,
        "final_loss": result.final_loss,
        "curve": result.curve,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _restore(
    checkpoint: Checkpoint,
    trainer: Trainer,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    result: LoopResult,
) -> None:
    import torch

    trainer.load_adapter_state(checkpoint.tensors["adapter"])
    saved = checkpoint.state["optimizer"]
    slots: dict[int, dict[str, Any]] = {}
    for name, value in checkpoint.tensors.get("optimizer", {}).items():
        index, key = name.split(".", 1)
        slots.setdefault(int(index), {})[key] = value
    for name, value in saved.get("scalars", {}).items():
        index, key = name.split(".", 1)
        slots.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": slots, "param_groups": saved["param_groups"]})
    scheduler.load_state_dict({**checkpoint.state["scheduler"], "lr_lambdas": [None]})
    rng = checkpoint.tensors["rng"]
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["generator"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda.{i}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda.{i}"], device=i)
    result.first_loss = checkpoint.state.get("first_loss")
    result.final_loss = checkpoint.state.get("final_loss")
    result.curve = [list(p) for p in checkpoint.state.get("curve", [])]
