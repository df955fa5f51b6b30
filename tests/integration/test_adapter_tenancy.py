"""The adapter registry against a real redis-server and LocalStorage: tenants' namespaces
(what a tenant's job sees, uses, overwrites and deletes), and atomic publishing (one
winner among concurrent publishes of a name; a reader gets one whole revision)."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from imageq.api_client.client import Client
from imageq.api_client.errors import InvalidInput
from imageq.api_client.inputs import CaptionInput, GenerateInput
from imageq.api_client.records import RecordStore, connect
from imageq.api_client.settings import Settings
from imageq.workers.io.adapter_registry import AdapterRegistry
from imageq.workers.io.storage import LocalStorage
from imageq.workers.kinds.caption import CaptionAdapters, CaptionHandler
from imageq.workers.kinds.diffusion import DiffusionHandler
from imageq.workers.testing.services import RedisServer

_n = itertools.count()


@pytest.fixture
def settings(redis_server: RedisServer, tmp_path: Path) -> Settings:
    return Settings(
        broker_url=redis_server.url,
        storage_url=f"file://{tmp_path / 'storage'}",
        queue_prefix=f"adt{next(_n)}-{os.getpid()}-",
    )


@pytest.fixture
def registry(settings: Settings, tmp_path: Path) -> Iterator[AdapterRegistry]:
    client = connect(settings.records_redis_url)
    yield AdapterRegistry(
        RecordStore(client, settings), LocalStorage(tmp_path / "storage"), tmp_path / "cache"
    )
    client.close()


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    c = Client(settings)
    yield c
    c.close()


def files(tag: str) -> dict[str, bytes]:
    """An adapter's files, each marked with the version they belong to."""
    return {
        "adapter_model.safetensors": f"weights {tag}".encode(),
        "tokenizer.json": f"tokenizer {tag}".encode(),
        "vocab.txt": f"rows {tag}".encode(),
    }


def publish(
    registry: AdapterRegistry,
    name: str,
    tag: str,
    tenant: str | None = None,
    job: str | None = None,
    language: str | None = None,
    **kw: Any,
) -> dict[str, Any]:
    info: dict[str, Any] = {"target": "caption", "job_id": job or f"job-{tag}"}
    if language is not None:
        info["language"] = language
    return registry.publish(name, files(tag), info, tenant=tenant, **kw)


def found(registry: AdapterRegistry, name: str, tenant: str | None = None) -> dict[str, Any]:
    entry = registry.get(name, tenant)
    assert entry is not None, (name, tenant)
    return entry


def read_all(folder: Path) -> set[str]:
    return {p.read_text() for p in folder.iterdir()}


def _error(call: Callable[[], object]) -> str:
    with pytest.raises(InvalidInput) as caught:
        call()
    return caught.value.message


# -- namespaces -------------------------------------------------------------------------


def test_a_tenant_cannot_see_use_overwrite_or_delete_another_tenants_adapter(
    registry: AdapterRegistry, client: Client
) -> None:
    a = publish(registry, "style", "a", tenant="acme")
    assert a["tenant"] == "acme"
    assert a["prefix"].startswith("adapters/_tenants/acme/style/r")
    shared = publish(registry, "common", "s")
    assert shared["tenant"] is None and shared["prefix"].startswith("adapters/common/r")

    # Seeing: globex lists its own and the shared ones; the operator lists all.
    assert {e["name"] for e in client.adapters(tenant="globex")} == {"common"}
    assert {(e["name"], e["tenant"]) for e in client.adapters()} == {
        ("style", "acme"),
        ("common", None),
    }
    assert registry.get("style", "globex") is None
    assert registry.get("common", "globex") == shared

    # Using: a diffusion job and a caption job of globex get the answer a missing name gets.
    diffusion = DiffusionHandler(cast(Any, None), cast(Any, None), cast(Any, None), registry)
    caption = CaptionHandler(
        cast(Any, None), cast(Any, None), CaptionAdapters(registry, cast(Any, None))
    )
    gen = GenerateInput.model_validate({"prompt": "x", "adapters": [{"name": "style"}]})
    cap = CaptionInput.model_validate(
        {"images": ["https://example.com/a.png"], "adapter": "style", "language": "fr"}
    )
    owned = diffusion._owned_adapters(gen, "acme")
    assert [r.name for r in owned.adapters] == ["acme/style"]
    denied = [
        _error(lambda: diffusion._owned_adapters(gen, "globex")),
        _error(lambda: caption._adapter(cap, "globex")),
        _error(lambda: registry.local_dir("globex/style")),
    ]
    # Overwriting: globex publishing "style" makes its own; acme's is untouched.
    b = publish(registry, "style", "b", tenant="globex")
    assert b["tenant"] == "globex"
    assert registry.get("style", "acme") == a
    assert read_all(registry.local_dir("acme/style")) == {
        "weights a",
        "tokenizer a",
        "rows a",
    }
    # Deleting: globex deletes only its own, never acme's nor the shared one.
    assert client.delete_adapter("style", tenant="globex") is True
    assert client.delete_adapter("style", tenant="globex") is False
    assert client.delete_adapter("common", tenant="globex") is False
    assert registry.get("style", "acme") == a and registry.get("common") == shared
    # Byte for byte what a name no one published gets.
    assert registry.delete("style", "acme") is True
    missing = [
        _error(lambda: diffusion._owned_adapters(gen, "globex")),
        _error(lambda: caption._adapter(cap, "globex")),
        _error(lambda: registry.local_dir("globex/style")),
    ]
    assert denied == missing
    # Its files went with it.
    assert registry.storage.list("adapters/_tenants/acme/style/") == []


def test_a_tenant_job_resolves_its_own_name_before_the_shared_one(
    registry: AdapterRegistry,
) -> None:
    publish(registry, "style", "shared")
    publish(registry, "style", "mine", tenant="acme")
    assert found(registry, "style", "acme")["tenant"] == "acme"
    assert found(registry, "style", "globex")["tenant"] is None
    assert found(registry, "style")["tenant"] is None
    assert read_all(registry.local_dir("acme/style")) == {
        "weights mine",
        "tokenizer mine",
        "rows mine",
    }
    assert read_all(registry.local_dir("style")) == {
        "weights shared",
        "tokenizer shared",
        "rows shared",
    }


def test_language_picks_own_then_shared_never_another_tenants(registry: AdapterRegistry) -> None:
    adapters = CaptionAdapters(registry, cast(Any, None))
    publish(registry, "fr-shared", "s", language="fr")
    # Another tenant's French adapter, newer than every other: never chosen for acme.
    publish(registry, "fr-globex", "g", tenant="globex", language="fr")
    publish(registry, "de-globex", "d", tenant="globex", language="de")
    assert adapters.for_language("fr", "acme") == "fr-shared"
    assert adapters.for_language("fr") == "fr-shared"
    assert adapters.for_language("fr", "globex") == "fr-globex"
    # acme's own wins over a shared one even when older than another tenant's.
    publish(registry, "fr-acme", "a", tenant="acme", language="fr")
    publish(registry, "fr-shared", "s2", language="fr", overwrite=True)
    assert adapters.for_language("fr", "acme") == "fr-acme"
    # globex's German is not even offered to acme.
    message = _error(lambda: adapters.for_language("de", "acme"))
    assert "languages available: fr (" in message


# -- atomic publishing ------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_concurrent_publishes_of_one_name_have_exactly_one_winner(
    registry: AdapterRegistry, overwrite: bool
) -> None:
    if overwrite:
        publish(registry, "style", "old", tenant="acme")
    # Both pass the start check and stage their files before either switches.
    staged = threading.Barrier(2, timeout=10)
    calls: dict[str, int] = {}

    def guard_for(tag: str) -> Callable[[], None]:
        def guard() -> None:
            calls[tag] = calls.get(tag, 0) + 1
            if calls[tag] == len(files(tag)) + 1:  # the check before the switch
                staged.wait()

        return guard

    results: dict[str, object] = {}

    def run(tag: str) -> None:
        try:
            results[tag] = publish(
                registry, "style", tag, tenant="acme", overwrite=overwrite, guard=guard_for(tag)
            )
        except InvalidInput as exc:
            results[tag] = exc

    threads = [threading.Thread(target=run, args=(tag,)) for tag in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    won = [tag for tag, r in results.items() if isinstance(r, dict)]
    lost = [r for r in results.values() if isinstance(r, InvalidInput)]
    assert len(won) == 1 and len(lost) == 1, results
    assert "'style'" in lost[0].message and "another job" in lost[0].message
    assert found(registry, "style", "acme")["job_id"] == f"job-{won[0]}"
    assert read_all(registry.local_dir("acme/style")) == {
        f"weights {won[0]}",
        f"tokenizer {won[0]}",
        f"rows {won[0]}",
    }
    # The loser's staged files are gone.
    loser = "y" if won[0] == "x" else "x"
    kept = [registry.storage.get(k) for k in registry.storage.list("adapters/_tenants/acme/")]
    assert kept and not [data for data in kept if data.endswith(f" {loser}".encode())]


def test_the_same_job_may_publish_again_after_a_crash(registry: AdapterRegistry) -> None:
    first = publish(registry, "style", "one", job="job-1")
    again = publish(registry, "style", "two", job="job-1")
    assert again["revision"] != first["revision"]
    assert _error(lambda: publish(registry, "style", "three", job="job-2")) == (
        "name: adapter 'style' exists; set overwrite to replace it"
    )


class _PublishingDuringRead(LocalStorage):
    """LocalStorage that runs ``during`` once, right after the reader's first file."""

    during: Callable[[], None] | None = None

    def get(self, key: str) -> bytes:
        data = super().get(key)
        hook, self.during = self.during, None
        if hook is not None and "/style/" in key:
            hook()
        return data


@pytest.mark.parametrize("republishes", [1, 2])
def test_a_reader_gets_one_whole_revision_while_the_name_is_republished(
    settings: Settings, tmp_path: Path, republishes: int
) -> None:
    client = connect(settings.records_redis_url)
    storage = _PublishingDuringRead(tmp_path / "storage")
    store = RecordStore(client, settings)
    writer = AdapterRegistry(store, storage, tmp_path / "writer-cache")
    reader = AdapterRegistry(store, storage, tmp_path / "reader-cache")
    publish(writer, "style", "v1", overwrite=True)

    def republish() -> None:
        for i in range(republishes):
            publish(writer, "style", f"v{i + 2}", overwrite=True)

    storage.during = republish
    got = read_all(reader.local_dir("style"))
    # One republish: the revision the reader read stays whole. Two: it was pruned, and
    # the reader read the entry again and got the newest one, whole.
    tag = "v1" if republishes == 1 else "v3"
    assert got == {f"weights {tag}", f"tokenizer {tag}", f"rows {tag}"}
    # The cache is per revision: the next read is the newest version, downloaded anew.
    newest = f"v{republishes + 1}"
    assert read_all(reader.local_dir("style")) == {
        f"weights {newest}",
        f"tokenizer {newest}",
        f"rows {newest}",
    }
    client.close()


def test_an_entry_from_before_revisions_still_loads(registry: AdapterRegistry) -> None:
    for filename, data in files("legacy").items():
        registry.storage.put(f"adapters/old/{filename}", data, "application/octet-stream")
    registry.register_entry(
        {"name": "old", "files": sorted(files("legacy")), "version": "2026-01-01T00:00:00Z"}
    )
    assert registry.get("old", "acme") is not None
    assert read_all(registry.local_dir("old")) == {
        "weights legacy",
        "tokenizer legacy",
        "rows legacy",
    }
    # Re-published, it moves into a revision folder; the legacy files are left alone.
    publish(registry, "old", "new", overwrite=True)
    assert read_all(registry.local_dir("old")) == {"weights new", "tokenizer new", "rows new"}
    assert registry.storage.exists("adapters/old/vocab.txt")


class _Trainer:
    def export(self) -> dict[str, bytes]:
        return files("trained")


class _Control:
    holds = 0

    def hold(self) -> None:
        self.holds += 1


def test_a_tenants_finetune_checks_and_publishes_in_its_own_namespace(
    registry: AdapterRegistry,
) -> None:
    from types import SimpleNamespace

    from imageq.api_client.inputs import FinetuneInput
    from imageq.workers.kinds.finetune import FinetuneHandler
    from imageq.workers.training.loop import LoopResult

    ctx = SimpleNamespace(settings=Settings(), storage=registry.storage)
    handler = FinetuneHandler(cast(Any, ctx), "cpu", registry)
    publish(registry, "style", "acme-old", tenant="acme")
    publish(registry, "style", "shared")
    inp = FinetuneInput.model_validate(
        {"target": "diffusion", "dataset": "storage://d.zip", "name": "style"}
    )
    # Taken in acme's namespace and in the shared one, free in globex's.
    assert "exists" in _error(lambda: handler.check_name("job-g", inp, "acme"))
    assert "exists" in _error(lambda: handler.check_name("job-g", inp, None))
    handler.check_name("job-g", inp, "globex")
    control = _Control()
    result = LoopResult(steps=1, first_loss=1.0, final_loss=0.5, resumed_from_step=None)
    out = handler._publish(
        "job-g", inp, cast(Any, [1]), cast(Any, _Trainer()), result, cast(Any, control), "globex"
    )
    assert "/adapters/_tenants/globex/style/r" in out["uri"]
    # The guard ran before each file (the trainer's and imageq_adapter.json) and the switch.
    assert control.holds == len(files("trained")) + 2
    assert found(registry, "style", "globex")["job_id"] == "job-g"
    assert found(registry, "style", "acme")["job_id"] == "job-acme-old"
    assert found(registry, "style")["job_id"] == "job-shared"


def test_an_adapter_name_cannot_reach_into_another_tenants_namespace() -> None:
    """A tenant's registry field is ``{tenant}/{name}``: a caption job naming
    ``victim/secret`` would otherwise resolve, as a shared name, to the victim's adapter."""
    from imageq.api_client.adapters import lookup_fields
    from imageq.api_client.errors import InvalidInput
    from imageq.api_client.schemas import parse_job

    with pytest.raises(InvalidInput, match="adapter"):
        parse_job(
            {
                "id": "j",
                "kind": "caption",
                "input": {"image": "https://example.com/x.png", "adapter": "victim/secret"},
                "tenant": "attacker",
            }
        )
    with pytest.raises(InvalidInput):
        lookup_fields("victim/secret", "attacker")
