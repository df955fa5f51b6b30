"""Every predictor implements the protocol it declares, with methods of its own.

mypy checks the signatures (each class names its protocol as a base class); this test
checks the same at run time, and that no member is only the protocol's empty stub.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
from typing_extensions import get_protocol_members, is_protocol

from imageq.api_client.settings import Settings
from imageq.workers.kinds.diffusion import PipelineCalls
from imageq.workers.predictors.base import Batched, BatchedPredictor
from imageq.workers.predictors.caption import CaptionPredictor
from imageq.workers.predictors.diffusion import DiffusionPredictor
from imageq.workers.predictors.match import MatchPredictor

# What each class claims, and how to build one without loading a model.
CLAIMS: list[tuple[type, type, Callable[[], object]]] = [
    (CaptionPredictor, BatchedPredictor, lambda: CaptionPredictor("unused")),
    (MatchPredictor, BatchedPredictor, lambda: MatchPredictor("unused")),
    (
        DiffusionPredictor,
        BatchedPredictor,
        lambda: DiffusionPredictor("unused", settings=Settings()),
    ),
    (
        PipelineCalls,
        Batched,
        lambda: PipelineCalls(DiffusionPredictor("unused", settings=Settings())),
    ),
]


def _parameters(function: Callable[..., object]) -> list[str]:
    return [name for name in inspect.signature(function).parameters if name != "self"]


@pytest.mark.parametrize(
    ("cls", "protocol", "make"), CLAIMS, ids=lambda v: getattr(v, "__name__", "")
)
def test_each_predictor_implements_the_protocol_it_declares(
    cls: type, protocol: type, make: Callable[[], object]
) -> None:
    assert protocol in cls.__mro__, f"{cls.__name__} does not declare {protocol.__name__}"
    instance = make()
    assert isinstance(instance, protocol)
    protocols = [base for base in cls.__mro__ if is_protocol(base)]
    for name in sorted(get_protocol_members(protocol)):
        stubs = [vars(p)[name] for p in protocols if name in vars(p)]
        if not stubs or not callable(stubs[0]):  # an attribute, such as model_id
            assert hasattr(instance, name), f"{cls.__name__} lacks {name}"
            continue
        stub = stubs[0]
        owner = next(base for base in cls.__mro__ if name in vars(base))
        assert not is_protocol(owner), f"{cls.__name__}.{name} is only the protocol's stub"
        assert _parameters(getattr(cls, name)) == _parameters(stub), name
