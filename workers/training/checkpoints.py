"""Training checkpoints in storage, written so that a half-written one is never used.

A checkpoint is a folder ``{prefix}step-000000200/`` of tensor files (safetensors) and a
``state.json``, then last of all a ``manifest.json`` naming every file with its size and
SHA-256. A reader considers only folders whose manifest exists and whose listed files
are all present, and checks every hash while loading, so a worker killed mid-write (or
a storage that lost a file) costs a step count, never a corrupt resume. Nothing here
pickles: ``torch.save`` would, and a checkpoint is data a later process trusts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from imageq.api_client.records import utcnow
from imageq.workers.io.storage import Storage

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE = "state.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{9})$")


def _no_guard() -> None:
    return None


@dataclass
class Checkpoint:
    step: int
    #: File stem (``adapter``, ``optimizer``, ``rng``) -> tensors.
    tensors: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]
    uri: str


class CheckpointStore:
    """The checkpoints of one job under ``prefix`` (``jobs/{id}/checkpoints/``)."""

    def __init__(
        self, storage: Storage, prefix: str, keep: int = 2, guard: Callable[[], None] = _no_guard
    ) -> None:
        self.storage = storage
        self.prefix = prefix.rstrip("/") + "/"
        self.keep = max(1, keep)
        #: Raises unless this run may still write (``JobControl.hold``): a run that
        #: stalled past its lease and thawed must not save over, or prune, the
        #: checkpoints of the run that holds the job now.
        self.guard = guard

    def folder(self, step: int) -> str:
        return f"{self.prefix}step-{step:09d}/"

    def uri(self, step: int) -> str:
        return self.storage.uri(self.folder(step) + MANIFEST)

    # -- writing ------------------------------------------------------------------------
    def save(
        self, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]
    ) -> str:
        """Write one checkpoint (files first, the manifest last); returns its manifest URI."""
        from safetensors.torch import save

        folder = self.folder(step)
        blobs: dict[str, bytes] = {}
        for stem, group in tensors.items():
            # safetensors refuses views that share memory: give it plain CPU copies.
            plain = {k: v.detach().to("cpu").clone().contiguous() for k, v in group.items()}
            blobs[f"{stem}.safetensors"] = save(plain)
        blobs[STATE] = json.dumps({**state, "step": step}).encode()
        for name, data in blobs.items():
            self.guard()
            self.storage.put(folder + name, data, "application/octet-stream")
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "created_at": utcnow(),
            "files": {
                name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                for name, data in blobs.items()
            },
        }
        self.guard()
        uri = self.storage.put(folder + MANIFEST, json.dumps(manifest).encode(), "application/json")
        self.prune(step)
        return uri

    def prune(self, newest: int) -> None:
        """Keep the newest ``keep`` complete checkpoints; drop older and abandoned folders."""
        folders = self._folders()
        complete = [s for s in self._complete(folders) if s <= newest]
        keep = set(complete[-self.keep :])
        for step, keys in folders.items():
            if step in keep or step > newest:
                continue
            # The manifest goes first, so a folder is never complete while half deleted.
            ordered = sorted(keys, key=lambda k: not k.endswith("/" + MANIFEST))
            self.guard()
            for key in ordered:
                try:
                    self.storage.delete(key)
                except Exception as exc:  # a stale folder costs space, never correctness
                    log.warning("cannot delete old checkpoint file %s: %s", key, exc)

    # -- reading ------------------------------------------------------------------------
    def _folders(self) -> dict[int, list[str]]:
        folders: dict[int, list[str]] = {}
        for key in self.storage.list(self.prefix):
            folder, _, _name = key[len(self.prefix) :].partition("/")
            match = _STEP_DIR.match(folder)
            if match:
                folders.setdefault(int(match.group(1)), []).append(key)
        return folders

    def _complete(self, folders: dict[int, list[str]]) -> list[int]:
        """Steps whose manifest exists and lists only files that are present, ascending."""
        steps = []
        for step, keys in sorted(folders.items()):
            names = {k.rsplit("/", 1)[1] for k in keys}
            if MANIFEST not in names:
                continue
            manifest = self._manifest(step)
            if manifest is not None and set(manifest["files"]) <= names:
                steps.append(step)
        return steps

    def _manifest(self, step: int) -> dict[str, Any] | None:
        try:
            manifest = json.loads(self.storage.get(self.folder(step) + MANIFEST))
        except Exception as exc:
            log.warning("checkpoint %d: unreadable manifest: %s", step, exc)
            return None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            return None
        return manifest

    def steps(self) -> list[int]:
        """The steps of complete checkpoints, ascending."""
        return self._complete(self._folders())

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that loads and verifies; older ones are the fallback."""
        for step in reversed(self.steps()):
            try:
                return self.load(step)
            except Exception as exc:
                log.warning("checkpoint %d is unusable, trying an older one: %s", step, exc)
        return None

    def load(self, step: int) -> Checkpoint:
        from safetensors.torch import load

        manifest = self._manifest(step)
        if manifest is None:
            raise ValueError(f"checkpoint {step} has no readable manifest")
        folder = self.folder(step)
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        state: dict[str, Any] = {}
        for name, meta in manifest["files"].items():
            data = self.storage.get(folder + name)
            if len(data) != meta["bytes"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise ValueError(f"{name} does not match its manifest")
            if name == STATE:
                state = json.loads(data)
            elif name.endswith(".safetensors"):
                tensors[name.removesuffix(".safetensors")] = load(data)
        if state.get("step") != step:
            raise ValueError(f"{STATE} says step {state.get('step')}, not {step}")
        return Checkpoint(step, tensors, state, self.uri(step))
