"""The adapter registry: published LoRA adapters, their files in storage, a local cache.

Entries live in one Redis hash (what ``client.adapters()`` lists); files live under
``adapters/{name}/`` in storage. Workers fetch an adapter's files into a local cache on
first use, keyed by version, so a re-published adapter is picked up without a restart.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from api_client.errors import InvalidInput
from api_client.records import RecordStore, utcnow
from workers.io.storage import Storage

ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt", ".md")


class AdapterRegistry:
    def __init__(self, store: RecordStore, storage: Storage, cache_dir: Path) -> None:
        self.store = store
        self.storage = storage
        self.cache_dir = cache_dir
        self._lock = threading.Lock()

    @property
    def key(self) -> str:
        return self.store.key("adapters")

    def entries(self) -> list[dict[str, Any]]:
        raw = self.store.redis.hgetall(self.key)
        return sorted((json.loads(v) for v in raw.values()), key=lambda e: str(e["name"]))

    def get(self, name: str) -> dict[str, Any] | None:
        raw = self.store.redis.hget(self.key, name)
        return None if raw is None else dict(json.loads(str(raw)))

    def require(self, name: str) -> dict[str, Any]:
        entry = self.get(name)
        if entry is None:
            raise InvalidInput(f"adapters: no adapter named {name!r} in the registry")
        return entry

    def publish(
        self,
        name: str,
        files: dict[str, bytes],
        info: dict[str, Any],
        *,
        overwrite: bool = False,
        guard: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Upload the files, then register the entry (files first: never a dangling entry).

        ``guard`` raises unless the publishing run still holds its job (``JobControl.hold``):
        a run that stalled past its lease must not overwrite what the live run publishes.
        """
        for filename in files:
            if "/" in filename or not filename.endswith(ALLOWED_SUFFIXES):
                raise InvalidInput(f"adapters: refusing to publish file {filename!r}")
        if not overwrite and self.store.redis.hexists(self.key, name):
            raise InvalidInput(f"name: adapter {name!r} exists; set overwrite to replace it")
        version = utcnow()
        prefix = f"adapters/{name}/"
        for filename, data in files.items():
            if guard is not None:
                guard()
            self.storage.put(prefix + filename, data, "application/octet-stream")
        entry = {
            **info,
            "name": name,
            # Storage keys have no empty segment: name the folder, then mark it one.
            "uri": self.storage.uri(prefix.rstrip("/")) + "/",
            "files": sorted(files),
            "version": version,
            "created_at": version,
        }
        encoded = json.dumps(entry)
        if guard is not None:
            guard()
        if overwrite:
            self.store.redis.hset(self.key, name, encoded)
        elif not self.store.redis.hsetnx(self.key, name, encoded):
            raise InvalidInput(f"name: adapter {name!r} exists; set overwrite to replace it")
        return entry

    def register_entry(self, entry: dict[str, Any]) -> None:
        """Register files that are already in storage (tests, migrations)."""
        self.store.redis.hset(self.key, entry["name"], json.dumps(entry))

    def local_dir(self, name: str) -> Path:
        """A local folder holding the adapter's current files (downloaded once per version)."""
        entry = self.require(name)
        version = str(entry.get("version", "0")).replace(":", "-")
        target = self.cache_dir / name / version
        with self._lock:
            if target.is_dir():
                return target
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
            try:
                for filename in entry.get("files", []):
                    if "/" in filename or not filename.endswith(ALLOWED_SUFFIXES):
                        raise InvalidInput(f"adapters: {name!r} lists a bad file {filename!r}")
                    data = self.storage.get(f"adapters/{name}/{filename}")
                    (staging / filename).write_bytes(data)
                staging.rename(target)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
        return target
