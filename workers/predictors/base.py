"""The small interface every model kind implements (after LitServe's LitAPI, cog's Predictor)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

from api_client.errors import ImageqError, ModelError, OutOfMemory

# Called by long-running predictors after every step (a denoising step, a training step).
# It records progress and raises ``Canceled`` or ``JobTimeout`` to stop the work at once.
StepCallback = Callable[[int, int, dict[str, Any]], None]


@runtime_checkable
class Predictor(Protocol):
    """Holds one warm model. Nothing loads before ``setup``."""

    #: The model id or local path, reported in every job record.
    model_id: str

    def setup(self, device: str) -> None:
        """Load the model onto ``device`` once and warm it up; raise on failure."""

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        """Run one batch of compatible items; one result per item, in order."""


class BatchedPredictor(Predictor, Protocol):
    """A predictor whose items can share a forward pass when their keys are equal."""

    def batch_key(self, item: Any) -> Hashable:
        """Items with equal keys may run in one ``predict`` call."""


@contextmanager
def model_errors(what: str, oom_hint: str = "") -> Iterator[None]:
    """Report failures of a forward or training step as ``OutOfMemory`` or ``ModelError``."""
    import torch

    try:
        yield
    except ImageqError:
        raise
    except torch.OutOfMemoryError as exc:
        # Free the cached blocks so that the next, perhaps smaller, batch can run.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise OutOfMemory(f"{what}: {exc}{oom_hint}") from exc
    except Exception as exc:
        raise ModelError(f"{what}: {type(exc).__name__}: {exc}") from exc
