"""The adapter registry: published LoRA adapters, their files in storage, a local cache.

Entries live in one Redis hash (what ``client.adapters()`` lists), one field per owner
and name (``imageq.api_client.adapters``: ``{name}`` shared, ``{tenant}/{name}`` a tenant's).
Each publish stages its files under a folder of their own,
``adapters/[_tenants/{tenant}/]{name}/{revision}/``, and then switches the entry to it in
one step (a Lua compare-and-set on the revision it replaces), so two jobs publishing one
name cannot both win, and a reader that read an entry downloads exactly that revision's
files: a re-publish writes a new folder and never touches the one being read. Entries
from before revisions (no ``prefix``) keep their files in ``adapters/{name}/``.

Workers fetch an adapter's files into a local cache on first use, keyed by owner, name
and revision, so a re-published adapter is picked up without a restart.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.commands.core import Script

from imageq.api_client.adapters import adapter_field, adapter_folder, lookup_fields
from imageq.api_client.errors import InvalidInput
from imageq.api_client.records import RecordStore, utcnow
from imageq.api_client.scripts import script
from imageq.workers.io.storage import ObjectNotFound, Storage

ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt", ".md")


def revision_of(entry: dict[str, Any]) -> str:
    """What identifies one publish of an entry (legacy entries: their version)."""
    return str(entry.get("revision") or entry.get("version") or "")


def _new_revision(version: str) -> str:
    # Sorts by time like the version; the random tail keeps two publishes of one
    # millisecond apart. "r" first: a storage segment, never a legacy file's name.
    stamp = "".join(ch for ch in version if ch.isdigit())
    return f"r{stamp}-{secrets.token_hex(4)}"


def _by_name(entry: dict[str, Any]) -> str:
    return str(entry["name"])


def _check_files(name: str, filenames: list[str]) -> None:
    for filename in filenames:
        if "/" in filename or not filename.endswith(ALLOWED_SUFFIXES):
            raise InvalidInput(f"adapters: {name!r}: refusing file {filename!r}")


class AdapterRegistry:
    def __init__(self, store: RecordStore, storage: Storage, cache_dir: Path) -> None:
        self.store = store
        self.storage = storage
        self.cache_dir = cache_dir
        self._lock = threading.Lock()

    @property
    def key(self) -> str:
        return self.store.keys.adapters()

    @property
    def _switch(self) -> Script:
        return script(self.store.redis, "adapter_switch")

    # -- reading --------------------------------------------------------------------------
    def entries(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """What a job of ``tenant`` may use: its own entries first, then the shared ones
        (a job without a tenant: the shared ones only), each sorted by name."""
        raw = self.store.redis.hgetall(self.key)
        own, shared = [], []
        for field, value in raw.items():
            owner, _, _name = str(field).rpartition("/")
            if not owner:
                shared.append(json.loads(value))
            elif owner == tenant:
                own.append(json.loads(value))
        return sorted(own, key=_by_name) + sorted(shared, key=_by_name)

    def entry(self, field: str) -> dict[str, Any] | None:
        """The entry stored at ``field`` (``imageq.api_client.adapters.adapter_field``)."""
        raw = self.store.redis.hget(self.key, field)
        return None if raw is None else dict(json.loads(str(raw)))

    def get(self, name: str, tenant: str | None = None) -> dict[str, Any] | None:
        """``name`` as a job of ``tenant`` means it: its own, else the shared one. Another
        tenant's adapter is not there, exactly like a missing one."""
        for field in lookup_fields(name, tenant):
            entry = self.entry(field)
            if entry is not None:
                return entry
        return None

    def require(self, name: str, tenant: str | None = None) -> dict[str, Any]:
        entry = self.get(name, tenant)
        if entry is None:
            raise InvalidInput(f"adapters: no adapter named {name!r} in the registry")
        return entry

    # -- publishing -----------------------------------------------------------------------
    def publish(
        self,
        name: str,
        files: dict[str, bytes],
        info: dict[str, Any],
        *,
        overwrite: bool = False,
        guard: Callable[[], None] | None = None,
        tenant: str | None = None,
    ) -> dict[str, Any]:
        """Stage the files under a new revision folder, then switch the entry to it.

        The switch succeeds only if the entry still holds what it held when this publish
        began (or what the same job, ``info["job_id"]``, published: a re-publish after a
        crash); otherwise another job published the name meanwhile and this one fails
        with ``InvalidInput`` naming it. ``guard`` raises unless the publishing run still
        holds its job (``JobControl.hold``): a run that stalled past its lease must not
        overwrite what the live run publishes.
        """
        _check_files(name, list(files))
        field = adapter_field(name, tenant)
        job_id = str(info.get("job_id") or "")
        current = self.entry(field)
        ours = bool(job_id) and (current or {}).get("job_id") == job_id
        if current is not None and not overwrite and not ours:
            raise InvalidInput(f"name: adapter {name!r} exists; set overwrite to replace it")
        expected = "" if current is None else revision_of(current)
        version = utcnow()
        revision = _new_revision(version)
        prefix = f"{adapter_folder(name, tenant)}/{revision}/"
        for filename, data in files.items():
            if guard is not None:
                guard()
            self.storage.put(prefix + filename, data, "application/octet-stream")
        entry = {
            **info,
            "name": name,
            "tenant": tenant,
            # Storage keys have no empty segment: name the folder, then mark it one.
            "uri": self.storage.uri(prefix.rstrip("/")) + "/",
            "prefix": prefix,
            "files": sorted(files),
            "version": version,
            "revision": revision,
            "created_at": version,
        }
        if guard is not None:
            guard()
        result = self._switch(keys=[self.key], args=[field, expected, json.dumps(entry), job_id])
        if int(result[0]) != 1:
            self._remove_folder(prefix)
            by = f" (by job {result[2]})" if len(result) > 2 and result[2] else ""
            raise InvalidInput(
                f"name: adapter {name!r} was published by another job while this one "
                f"ran{by}; set overwrite and run again to replace it"
            )
        self._prune(name, tenant, keep={revision, expected})
        return entry

    def register_entry(self, entry: dict[str, Any]) -> None:
        """Register files that are already in storage (tests, migrations)."""
        field = adapter_field(str(entry["name"]), entry.get("tenant"))
        self.store.redis.hset(self.key, field, json.dumps(entry))

    def delete(self, name: str, tenant: str | None = None) -> bool:
        """Remove ``tenant``'s own ``name`` (None: the shared one) and its files; False if
        there was none. Never another namespace's, even a shared one a tenant uses."""
        removed = bool(self.store.redis.hdel(self.key, adapter_field(name, tenant)))
        if removed:
            self._prune(name, tenant, keep=set())
        return removed

    def _prune(self, name: str, tenant: str | None, keep: set[str]) -> None:
        """Delete revision folders other than ``keep``: the one just published and the
        one it replaced (a worker may still be downloading that one)."""
        folder = adapter_folder(name, tenant) + "/"
        for key in self.storage.list(folder):
            revision, sep, _file = key[len(folder) :].partition("/")
            # Only revision folders: a legacy adapter's files sit in the folder itself.
            if sep and revision.startswith("r") and revision not in keep:
                self.storage.delete(key)

    def _remove_folder(self, prefix: str) -> None:
        for key in self.storage.list(prefix):
            self.storage.delete(key)

    # -- the local cache ------------------------------------------------------------------
    def local_dir(self, field: str) -> Path:
        """A local folder holding the files of the revision ``field`` names now
        (downloaded once per revision). ``field``: ``adapter_field(name, owner)``, what
        ``get`` resolved; never a name a tenant typed."""
        for _attempt in range(2):
            entry = self.entry(field)
            if entry is None:
                name = field.rpartition("/")[2]
                raise InvalidInput(f"adapters: no adapter named {name!r} in the registry")
            try:
                return self._download(field, entry)
            except ObjectNotFound:
                # Pruned while we read it: two re-publishes came meanwhile. Read the entry
                # again once; the newest revision's files are all there.
                if revision_of(self.entry(field) or {}) == revision_of(entry):
                    raise
        raise InvalidInput(f"adapters: {field!r} changed twice while it was downloaded")

    def _download(self, field: str, entry: dict[str, Any]) -> Path:
        name = str(entry["name"])
        owner = field.rpartition("/")[0]
        folder = ("tenants/" + owner) if owner else "shared"
        target = self.cache_dir / folder / name / revision_of(entry).replace(":", "-")
        # Legacy entries (before revisions) keep their files in the adapter's folder.
        prefix = str(entry.get("prefix") or f"adapters/{name}/")
        with self._lock:
            if target.is_dir():
                return target
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
            try:
                filenames = [str(f) for f in entry.get("files", [])]
                _check_files(name, filenames)
                for filename in filenames:
                    (staging / filename).write_bytes(self.storage.get(prefix + filename))
                staging.rename(target)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
        return target
