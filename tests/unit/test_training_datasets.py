"""Finetune datasets: archives and prefixes in, validated examples out, bad ones named."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from imageq.api_client.errors import ForbiddenUrl, InvalidInput
from imageq.api_client.settings import Settings
from imageq.workers.io.storage import LocalStorage
from imageq.workers.training.datasets import load_dataset, safe_name
from tests.helpers import ImageServer, bomb_png, image_server, png_bytes

GOOD = {
    "a.png": png_bytes((200, 10, 10)),
    "b.png": png_bytes((10, 200, 10)),
}


def metadata(*lines: object) -> bytes:
    return "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode()


def good_files(folder: str = "") -> dict[str, bytes]:
    files = {folder + name: data for name, data in GOOD.items()}
    files[folder + "metadata.jsonl"] = metadata(
        {"file_name": "a.png", "text": "un chat rouge"},
        "",
        {"file_name": "b.png", "text": "un chien vert"},
    )
    return files


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buf.getvalue()


def tar_bytes(files: dict[str, bytes], mode: str = "w:gz", link: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            archive.addfile(info)
    return buf.getvalue()


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage")


@pytest.fixture
def settings() -> Settings:
    return Settings(allow_private_urls=True)


def load(
    ref: str, settings: Settings, storage: LocalStorage, tmp_path: Path, missing: bool = False
) -> list[tuple[str, str | None]]:
    dataset = load_dataset(ref, tmp_path / "work", settings, storage, allow_missing_text=missing)
    return [(e.file_name, e.text) for e in dataset.examples]


EXPECTED = [("a.png", "un chat rouge"), ("b.png", "un chien vert")]


@pytest.mark.parametrize(
    "name, data",
    [
        ("ds.zip", zip_bytes(good_files())),
        ("folder.zip", zip_bytes(good_files("photos/"))),
        ("ds.tar.gz", tar_bytes(good_files())),
        ("ds.tar", tar_bytes(good_files("x/"), mode="w")),
    ],
)
def test_archives_in_storage(
    name: str, data: bytes, settings: Settings, storage: LocalStorage, tmp_path: Path
) -> None:
    uri = storage.put(f"datasets/{name}", data, "application/octet-stream")
    assert load(uri, settings, storage, tmp_path) == EXPECTED


def test_storage_prefix_and_local_folder(
    settings: Settings, storage: LocalStorage, tmp_path: Path
) -> None:
    for name, data in good_files().items():
        storage.put(f"datasets/pets/{name}", data, "application/octet-stream")
    prefix = storage.uri("datasets/pets/x")[: -len("x")]
    assert load(prefix, settings, storage, tmp_path) == EXPECTED
    small = settings.with_(max_dataset_bytes=len(GOOD["a.png"]) + 1)
    with pytest.raises(InvalidInput, match="add up to more than"):
        load(prefix, small, storage, tmp_path / "0")

    folder = tmp_path / "local"
    folder.mkdir()
    for name, data in good_files().items():
        (folder / name).write_bytes(data)
    with pytest.raises(ForbiddenUrl, match="not allowed"):
        load(folder.as_uri(), settings, storage, tmp_path / "1")
    local = settings.with_(allow_local_files=True)
    assert load(folder.as_uri(), local, storage, tmp_path / "2") == EXPECTED


@pytest.fixture
def http() -> Iterator[ImageServer]:
    with image_server() as server:
        yield server


def test_http_archive_with_its_own_byte_cap(
    http: ImageServer, settings: Settings, storage: LocalStorage, tmp_path: Path
) -> None:
    data = zip_bytes(good_files())
    http.files["/ds.zip"] = data
    # The image cap does not apply to a dataset; the dataset cap does.
    small_images = settings.with_(max_image_bytes=len(data) - 1)
    assert load(http.url("/ds.zip"), small_images, storage, tmp_path / "1") == EXPECTED
    capped = settings.with_(max_dataset_bytes=len(data) - 1)
    with pytest.raises(InvalidInput, match=r"dataset: .*larger than"):
        load(http.url("/ds.zip"), capped, storage, tmp_path / "2")
    guarded = settings.with_(allow_private_urls=False)
    with pytest.raises(ForbiddenUrl, match="loopback"):
        load(http.url("/ds.zip"), guarded, storage, tmp_path / "3")
    with pytest.raises(InvalidInput, match="must be a zip or tar"):
        load(http.url("/folder/"), settings, storage, tmp_path / "4")


@pytest.mark.parametrize(
    "files, problem",
    [
        ({**good_files(), "b.png": b""}, r"b\.png: unreadable image"),
        ({**good_files(), "b.png": b"GIF89a not really"}, r"b\.png: unreadable image"),
        ({**good_files(), "b.png": bomb_png()}, r"b\.png: unreadable image: .*pixels"),
        ({k: v for k, v in good_files().items() if k != "b.png"}, r"b\.png: file missing"),
        (
            {**GOOD, "metadata.jsonl": metadata({"file_name": "a.png", "text": " "})},
            r"a\.png: empty text",
        ),
        (
            {**GOOD, "metadata.jsonl": metadata({"file_name": "a.png"})},
            r"a\.png: empty text",
        ),
        (
            {**GOOD, "metadata.jsonl": metadata({"file_name": "../a.png", "text": "x"})},
            r"\.\./a\.png: not a relative path",
        ),
        ({**GOOD, "metadata.jsonl": b"{not json"}, "line 1: not valid JSON"),
        ({**GOOD, "metadata.jsonl": metadata({"text": "x"})}, "line 1: .*file_name"),
        (GOOD, "no metadata.jsonl"),
        ({"metadata.jsonl": b""}, "no examples"),
    ],
)
def test_bad_datasets_name_the_file(
    files: dict[str, bytes],
    problem: str,
    settings: Settings,
    storage: LocalStorage,
    tmp_path: Path,
) -> None:
    uri = storage.put("datasets/bad.zip", zip_bytes(files), "application/zip")
    with pytest.raises(InvalidInput, match="dataset: .*" + problem):
        load(uri, settings, storage, tmp_path)


def test_every_problem_is_reported(
    settings: Settings, storage: LocalStorage, tmp_path: Path
) -> None:
    files = {
        "a.png": b"junk",
        "metadata.jsonl": metadata(
            {"file_name": "a.png", "text": "x"}, {"file_name": "gone.png", "text": "y"}
        ),
    }
    uri = storage.put("datasets/bad.zip", zip_bytes(files), "application/zip")
    with pytest.raises(InvalidInput) as caught:
        load(uri, settings, storage, tmp_path)
    assert "a.png: unreadable image" in caught.value.message
    assert "gone.png: file missing" in caught.value.message


def test_hostile_entries_never_leave_the_folder(
    settings: Settings, storage: LocalStorage, tmp_path: Path
) -> None:
    files = {**good_files(), "../escape.png": GOOD["a.png"], ".hidden/x.png": GOOD["a.png"]}
    uri = storage.put("datasets/evil.tar.gz", tar_bytes(files, link="link.png"), "x")
    assert load(uri, settings, storage, tmp_path) == EXPECTED
    assert not (tmp_path / "escape.png").exists()
    assert not (tmp_path / "work" / "link.png").exists()
    assert not (tmp_path / "work" / ".hidden").exists()
    for bad in ("/etc/passwd", "a/../../b", "c\\d", "", "./.git/config"):
        assert safe_name(bad) is None, bad
    assert str(safe_name("./photos//a.png")) == "photos/a.png"


def test_size_and_count_caps(settings: Settings, storage: LocalStorage, tmp_path: Path) -> None:
    # Compresses to almost nothing, unpacks to 10 MB: the cap counts what is read.
    big = {**good_files(), "padding.bin": b"\0" * 10_000_000}
    uri = storage.put("datasets/bomb.zip", zip_bytes(big), "application/zip")
    capped = settings.with_(max_dataset_unpacked_bytes=1_000_000)
    with pytest.raises(InvalidInput, match="unpacks to more than 1000000 bytes"):
        load(uri, capped, storage, tmp_path / "1")
    few = settings.with_(max_dataset_files=2)
    uri = storage.put("datasets/ok.zip", zip_bytes(good_files()), "application/zip")
    with pytest.raises(InvalidInput, match="more than 2 files"):
        load(uri, few, storage, tmp_path / "2")
    uri = storage.put("datasets/not.zip", b"just some bytes", "application/zip")
    with pytest.raises(InvalidInput, match="not a zip or tar archive"):
        load(uri, settings, storage, tmp_path / "3")


def test_auto_caption_accepts_missing_texts_and_unlisted_images(
    settings: Settings, storage: LocalStorage, tmp_path: Path
) -> None:
    files = {
        **GOOD,
        "c.png": png_bytes((1, 2, 3)),
        "metadata.jsonl": metadata({"file_name": "a.png", "text": "x"}, {"file_name": "b.png"}),
    }
    uri = storage.put("datasets/partial.zip", zip_bytes(files), "application/zip")
    assert load(uri, settings, storage, tmp_path, missing=True) == [
        ("a.png", "x"),
        ("b.png", None),
        ("c.png", None),
    ]
    only_images = storage.put("datasets/bare.zip", zip_bytes(GOOD), "application/zip")
    assert load(only_images, settings, storage, tmp_path / "2", missing=True) == [
        ("a.png", None),
        ("b.png", None),
    ]


def with_extras(files: dict[str, bytes], kind: str) -> bytes:
    """``files`` plus three folders and three symlinks, as a zip or a streamed tar."""
    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w") as archive:
            for i in range(3):
                archive.writestr(f"dir{i}/", b"")
                link = zipfile.ZipInfo(f"link{i}.png")
                link.external_attr = (0o120777) << 16
                archive.writestr(link, b"/etc/passwd")
            for name, data in files.items():
                archive.writestr(name, data)
        return buf.getvalue()
    with tarfile.open(fileobj=buf, mode="w|gz") as tar:
        for i in range(3):
            folder = tarfile.TarInfo(f"dir{i}")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
            link = tarfile.TarInfo(f"link{i}.png")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(link)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_folders_and_links_count_against_the_entry_cap(
    kind: str, settings: Settings, storage: LocalStorage, tmp_path: Path
) -> None:
    uri = storage.put(f"datasets/extras.{kind}", with_extras(good_files(), kind), "x")
    # Three files and six skipped entries: nine entries.
    assert load(uri, settings.with_(max_dataset_files=9), storage, tmp_path / "1") == EXPECTED
    with pytest.raises(InvalidInput, match=r"more than 8 files \(every entry counts"):
        load(uri, settings.with_(max_dataset_files=8), storage, tmp_path / "2")


def test_a_tar_of_too_many_entries_is_refused_while_streaming(
    storage: LocalStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = Settings()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|gz") as tar:
        folder = tarfile.TarInfo("d")
        folder.type = tarfile.DIRTYPE
        for _ in range(shipped.max_dataset_files + 20_000):
            tar.addfile(folder)
    data = buf.getvalue()
    assert len(data) < 1024 * 1024  # ~60 MB of headers, compressed
    uri = storage.put("datasets/entries.tar.gz", data, "application/gzip")
    opened: list[str] = []
    read = 0
    real_open, real_next = tarfile.open, tarfile.TarFile.next

    def spy_open(*args: object, **kwargs: object) -> tarfile.TarFile:
        opened.append(str(kwargs.get("mode")))
        return real_open(*args, **kwargs)

    def spy_next(self: tarfile.TarFile) -> tarfile.TarInfo | None:
        nonlocal read
        read += 1
        return real_next(self)

    monkeypatch.setattr(tarfile, "open", spy_open)
    monkeypatch.setattr(tarfile.TarFile, "next", spy_next)
    with pytest.raises(InvalidInput, match=f"more than {shipped.max_dataset_files} files"):
        load(uri, shipped, storage, tmp_path)
    assert opened == ["r|*"]
    # Refused at the entry past the cap (opening reads the first one ahead), not after
    # walking the whole archive.
    assert read <= shipped.max_dataset_files + 2
