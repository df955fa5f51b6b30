"""The small interfaces the model kinds implement (after LitServe's LitAPI, cog's Predictor).

``Predictor`` is what building a worker calls (``setup``); ``Batched`` is what the
micro-batcher (``imageq.workers.runtime.batching``) calls (``batch_key``, ``predict``).
Each predictor class names the protocol it implements as a base class, so mypy checks
its methods against it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from imageq.api_client.errors import ImageqError, ModelError, OutOfMemory

# Called by long-running predictors after every step (a denoising step, a training step).
# It records progress and raises ``Canceled`` or ``JobTimeout`` to stop the work at once.
StepCallback = Callable[[int, int, dict[str, Any]], None]

ItemT_contra = TypeVar("ItemT_contra", contravariant=True)
# Invariant: ``predict`` returns a list, which is invariant in its items.
ResultT = TypeVar("ResultT")


@runtime_checkable
class Predictor(Protocol):
    """Holds one warm model. Nothing loads before ``setup``."""

    #: The model id or local path, reported in every job record.
    model_id: str

    def setup(self, device: str) -> None:
        """Load the model onto ``device`` once and warm it up; raise on failure."""
        ...


@runtime_checkable
class Batched(Protocol[ItemT_contra, ResultT]):
    """Items whose keys are equal can share one ``predict`` call."""

    def batch_key(self, item: ItemT_contra) -> Hashable:
        """Items with equal keys may run in one ``predict`` call."""
        ...

    def predict(self, batch: Sequence[ItemT_contra]) -> list[ResultT]:
        """Run one batch of compatible items; one result per item, in order.

        May raise ``BatchInterrupted`` when one item's own error stopped the whole call.
        """
        ...


@runtime_checkable
class BatchedPredictor(Predictor, Batched[ItemT_contra, ResultT], Protocol[ItemT_contra, ResultT]):
    """A warm model whose items share forward passes: what caption, match and
    generate serve behind the micro-batcher."""


class BatchInterrupted(Exception):
    """One item's own error (its step callback raised: cancel, timeout) stopped a
    shared ``predict`` call.

    ``error`` is what was raised for item ``index``; the other items produced nothing
    and can run again (a generate job gets the same images: each image's noise depends
    only on its own seed).
    """

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(f"item {index} of the batch stopped: {error}")
        self.index = index
        self.error = error


def check_local_model(model_id: str) -> None:
    """Name a missing local directory plainly instead of as a malformed hub id."""
    path = Path(model_id)
    if (path.is_absolute() or model_id.startswith(".")) and not path.is_dir():
        raise ModelError(f"model directory {model_id} does not exist")


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
