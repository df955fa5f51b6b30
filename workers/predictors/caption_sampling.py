"""Seeded sampling for captions (``generation.seed``).

transformers' ``generate`` draws every row of a batch from one global random state, and
takes no per-row generator. So a seeded, sampled caption is generated alone, with the
random state set from its seed for that call and restored afterwards: the same seed,
image and options give the same caption whether the job came alone or beside others,
and unseeded jobs keep their batches. Exact on the same model, device type, dtype and
torch/transformers versions (kernels and sampling code may change between them).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def seeded(seed: int, device: str) -> Iterator[None]:
    """The global random state (CPU, and ``device``'s GPU) set from ``seed`` for the body."""
    import torch

    devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
