"""``imageq submit finetune DIR``: the folder zipped into the deployment's storage, where a
worker reads it; and a local storage URL that names one folder wherever a process starts."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from imageq.api_client.cli import dataset_ref, zip_folder
from imageq.api_client.errors import InvalidInput
from imageq.api_client.settings import Settings, SettingsError
from imageq.api_client.uploads import DATASET_PREFIX, local_root
from imageq.workers.io.storage import LocalStorage, open_storage
from imageq.workers.training.datasets import fetch_dataset, read_dataset


def folder(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines), encoding="utf-8")
    (root / ".DS_Store").write_bytes(b"junk")
    return root


def test_a_folder_is_zipped_uploaded_and_read_by_a_worker(tmp_path: Path) -> None:
    settings = Settings(storage_url=(tmp_path / "storage").as_uri())
    ref = dataset_ref(str(folder(tmp_path / "data")), settings)
    storage = open_storage(settings)
    assert ref.startswith(storage.uri("x")[:-1] + DATASET_PREFIX) and ref.endswith(".zip")
    dest = tmp_path / "fetched"
    fetch_dataset(ref, dest, settings, storage)
    dataset = read_dataset(dest, settings, allow_missing_text=False)
    assert sorted(e.text or "" for e in dataset.examples) == [f"picture {i}" for i in range(3)]
    assert not (dest / ".DS_Store").exists()
    # A URL passes through untouched.
    assert dataset_ref("s3://bucket/data/", settings) == "s3://bucket/data/"


def test_images_are_stored_and_text_deflated(tmp_path: Path) -> None:
    data = zip_folder(folder(tmp_path / "data"), 10**6)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        methods = {i.filename: i.compress_type for i in archive.infolist()}
    assert methods == {
        "0.png": zipfile.ZIP_STORED,
        "1.png": zipfile.ZIP_STORED,
        "2.png": zipfile.ZIP_STORED,
        "metadata.jsonl": zipfile.ZIP_DEFLATED,
    }
    with pytest.raises(InvalidInput, match="IMAGEQ_MAX_DATASET_BYTES"):
        zip_folder(tmp_path / "data", 100)


def test_a_folder_without_metadata_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    settings = Settings(storage_url=(tmp_path / "s").as_uri())
    with pytest.raises(InvalidInput, match=r"metadata\.jsonl"):
        dataset_ref(str(tmp_path / "empty"), settings)


def test_local_storage_is_one_folder_wherever_a_process_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # The shipped default: under the home folder, not the working directory.
    default = Settings.from_env({})
    assert default.storage_url == "file://~/imageq-data"
    roots = []
    for cwd in (tmp_path / "a", tmp_path / "b"):
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        store = open_storage(default)
        assert isinstance(store, LocalStorage)
        roots.append((store.root, local_root(default.storage_url)))
    expected = tmp_path / "home" / "imageq-data"
    assert roots == [(expected, expected)] * 2
    assert os.path.isabs(expected)


def test_a_relative_local_storage_url_is_a_clear_error() -> None:
    with pytest.raises(SettingsError, match="relative to each process's working directory"):
        Settings.from_env({"IMAGEQ_STORAGE_URL": "file://./imageq-data"})
    assert Settings(storage_url="file:///srv/imageq").storage_url == "file:///srv/imageq"
    assert Settings(storage_url="file://localhost/srv/x").storage_url.endswith("/srv/x")
