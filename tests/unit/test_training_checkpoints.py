"""Checkpoints: never a half-written one, never a pickle; a resumed run equals an unbroken one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from imageq.workers.io.storage import LocalStorage
from imageq.workers.runtime.control import LeaseLost
from imageq.workers.training.checkpoints import MANIFEST, CheckpointStore
from imageq.workers.training.loop import LoopConfig, batch_indices, run_training


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage")


def tensors(step: int) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "adapter": {"w": torch.full((2, 3), float(step)), "b": torch.arange(3.0)},
        "rng": {"torch": torch.get_rng_state()},
    }


def save(store: CheckpointStore, step: int) -> None:
    store.save(step, tensors(step), {"note": f"at {step}", "curve": [[step, 1.5]]})


def test_round_trip(storage: LocalStorage) -> None:
    store = CheckpointStore(storage, "jobs/j/checkpoints/", keep=5)
    save(store, 10)
    save(store, 20)
    assert store.steps() == [10, 20]
    latest = store.latest()
    assert latest is not None and latest.step == 20
    assert torch.equal(latest.tensors["adapter"]["w"], torch.full((2, 3), 20.0))
    assert latest.state["note"] == "at 20" and latest.state["step"] == 20
    assert latest.uri.endswith("jobs/j/checkpoints/step-000000020/manifest.json")
    files = sorted(p.name for p in (storage.root / "jobs/j/checkpoints/step-000000020").iterdir())
    # Tensors as safetensors, the rest as JSON: nothing a loader would unpickle.
    assert files == ["adapter.safetensors", "manifest.json", "rng.safetensors", "state.json"]


def test_a_checkpoint_killed_before_its_manifest_is_never_used(
    storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(storage, "ck/", keep=5)
    save(store, 10)
    real_put = storage.put

    def dies_at_manifest(key: str, data: bytes, content_type: str) -> str:
        if key.endswith(MANIFEST):
            raise KeyboardInterrupt("SIGKILL stand-in")
        return real_put(key, data, content_type)

    monkeypatch.setattr(storage, "put", dies_at_manifest)
    with pytest.raises(KeyboardInterrupt):
        save(store, 20)
    monkeypatch.undo()
    assert (storage.root / "ck/step-000000020/adapter.safetensors").exists()
    assert store.steps() == [10]
    latest = store.latest()
    assert latest is not None and latest.step == 10


def test_missing_or_corrupt_files_fall_back_to_an_older_checkpoint(
    storage: LocalStorage,
) -> None:
    store = CheckpointStore(storage, "ck/", keep=5)
    for step in (10, 20, 30):
        save(store, step)
    (storage.root / "ck/step-000000030/rng.safetensors").unlink()
    assert store.steps() == [10, 20]
    corrupt = storage.root / "ck/step-000000020/adapter.safetensors"
    corrupt.write_bytes(corrupt.read_bytes()[:-4] + b"\0\0\0\0")
    latest = store.latest()
    assert latest is not None and latest.step == 10


def test_never_unpickles(storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(storage, "ck/")
    save(store, 5)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("checkpoints must not go through pickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch, "save", refuse)
    save(store, 6)
    latest = store.latest()
    assert latest is not None and latest.step == 6


def test_pruning_keeps_the_newest_complete_ones(storage: LocalStorage) -> None:
    store = CheckpointStore(storage, "ck/", keep=2)
    save(store, 10)
    # An abandoned, manifest-less folder from a crashed attempt.
    storage.put("ck/step-000000015/adapter.safetensors", b"half", "x")
    save(store, 20)
    save(store, 30)
    assert store.steps() == [20, 30]
    folders = sorted(p.name for p in (storage.root / "ck").iterdir() if any(p.iterdir()))
    assert folders == ["step-000000020", "step-000000030"]
    manifest = json.loads(storage.get("ck/step-000000030/manifest.json"))
    assert set(manifest["files"]) == {"adapter.safetensors", "rng.safetensors", "state.json"}


def test_batches_are_stateless_epoch_permutations() -> None:
    seen = [i for step in range(1, 6) for i in batch_indices(step, 2, 5, seed=3)]
    assert sorted(seen[:5]) == list(range(5)) and sorted(seen[5:]) == list(range(5))
    assert batch_indices(4, 2, 5, seed=3) == seen[6:8]
    assert seen != [i for step in range(1, 6) for i in batch_indices(step, 2, 5, seed=4)]


class ToyTrainer:
    """A LoRA-shaped toy: noise from the generator and dropout from the global RNG."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.base = torch.nn.Linear(4, 4).requires_grad_(False)
        self.a = torch.nn.Parameter(torch.randn(2, 4) * 0.1)
        self.b = torch.nn.Parameter(torch.zeros(4, 2))
        self.x = torch.randn(6, 4)
        self.y = torch.randn(6, 4)

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [("a", self.a), ("b", self.b)]

    def loss(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        x = self.x[indices] + 0.01 * torch.randn(len(indices), 4, generator=generator)
        h = torch.nn.functional.dropout(x @ self.a.T, p=0.2, training=True)
        return torch.nn.functional.mse_loss(self.base(x) + h @ self.b.T, self.y[indices])

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {"a": self.a.data, "b": self.b.data}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        self.a.data.copy_(state["a"])
        self.b.data.copy_(state["b"])

    def export(self) -> dict[str, bytes]:
        return {}


class Crash(Exception):
    pass


def test_resume_takes_exactly_the_steps_an_unbroken_run_takes(storage: LocalStorage) -> None:
    config = LoopConfig(
        max_steps=20, batch_size=2, learning_rate=0.05, checkpoint_every=5, seed=1, examples=6
    )
    losses: dict[str, list[float]] = {"unbroken": [], "broken": []}

    def recorder(name: str, crash_at: int | None = None) -> Any:
        def control(step: int, total: int, extra: dict[str, Any]) -> None:
            assert extra["stage"] == "training" and total == 20
            losses[name].append(extra["loss"])
            if step == crash_at:
                raise Crash

        return control

    unbroken = ToyTrainer()
    whole = run_training(unbroken, config, CheckpointStore(storage, "a/"), recorder("unbroken"))
    assert whole.resumed_from_step is None and whole.steps_run == 20
    assert whole.checkpoints == [5, 10, 15, 20]

    store = CheckpointStore(storage, "b/")
    with pytest.raises(Crash):
        run_training(ToyTrainer(), config, store, recorder("broken", crash_at=13))
    # The crashed run's steps 11-13 are lost with it; the resumed run redoes them.
    del losses["broken"][10:]
    resumed_trainer = ToyTrainer()
    resumed = run_training(resumed_trainer, config, store, recorder("broken"))
    assert resumed.resumed_from_step == 10 and resumed.steps_run == 10
    assert resumed.steps == 20 and resumed.checkpoints == [15, 20]
    assert losses["broken"] == losses["unbroken"]
    assert torch.equal(resumed_trainer.a, unbroken.a) and torch.equal(resumed_trainer.b, unbroken.b)
    assert resumed.first_loss == whole.first_loss and resumed.final_loss == whole.final_loss
    assert resumed.curve == whole.curve

    # A job whose last checkpoint is its final step only needs publishing.
    done = run_training(ToyTrainer(), config, store, recorder("broken"))
    assert done.resumed_from_step == 20 and done.steps_run == 0
    assert done.final_loss == whole.final_loss


def test_a_hand_back_checkpoints_the_step_it_stops_at(storage: LocalStorage) -> None:
    """SIGTERM mid-run: the step just taken is saved, off the checkpoint_every grid, and
    the resumed run continues from it exactly as an unbroken run would."""
    from imageq.workers.runtime.control import HandedBack

    config = LoopConfig(
        max_steps=20, batch_size=2, learning_rate=0.05, checkpoint_every=5, seed=1, examples=6
    )
    unbroken = ToyTrainer()
    run_training(unbroken, config, CheckpointStore(storage, "a/"), lambda *_: None)

    store = CheckpointStore(storage, "b/")
    seen: list[int] = []
    with pytest.raises(HandedBack, match="step 7"):
        run_training(
            ToyTrainer(),
            config,
            store,
            lambda step, total, extra: seen.append(step),
            stop_requested=lambda: len(seen) >= 6,
        )
    assert store.steps() == [5, 7] and seen == [1, 2, 3, 4, 5, 6]
    resumed_trainer = ToyTrainer()
    resumed = run_training(resumed_trainer, config, store, lambda *_: None)
    assert resumed.resumed_from_step == 7 and resumed.steps_run == 13
    assert torch.equal(resumed_trainer.a, unbroken.a) and torch.equal(resumed_trainer.b, unbroken.b)


def test_a_run_that_lost_its_job_neither_saves_nor_prunes(storage: LocalStorage) -> None:
    """A run that stalled past its lease and thawed while another run trains the job: its
    save must not write a checkpoint, nor prune the live run's half-written one."""
    live = CheckpointStore(storage, "ck/", keep=1)
    save(live, 30)
    # The live run is writing step 40: its files are there, its manifest is not yet.
    storage.put("ck/step-000000040/adapter.safetensors", b"half", "application/octet-stream")

    def lost() -> None:
        raise LeaseLost("job j: another worker holds the job now")

    stale = CheckpointStore(storage, "ck/", keep=1, guard=lost)
    with pytest.raises(LeaseLost):
        save(stale, 50)
    with pytest.raises(LeaseLost):
        stale.prune(50)
    assert storage.exists("ck/step-000000040/adapter.safetensors")
    assert [k for k in storage.list("ck/") if "step-000000050" in k] == []
    assert live.steps() == [30]
