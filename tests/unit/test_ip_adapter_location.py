"""IMAGEQ_IP_ADAPTER as a local folder or a hub repository (compose's default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import huggingface_hub
import pytest

from imageq.api_client.errors import ModelError
from imageq.workers.predictors.adapters import IP_ADAPTER_WEIGHT_NAME, ip_adapter_files


def _lay_out(folder: Path) -> Path:
    (folder / "image_encoder").mkdir(parents=True)
    (folder / IP_ADAPTER_WEIGHT_NAME).write_bytes(b"weights")
    return folder


def test_a_local_folder(tmp_path: Path) -> None:
    folder = _lay_out(tmp_path / "models")
    assert ip_adapter_files(folder) == (folder, IP_ADAPTER_WEIGHT_NAME)


def test_a_hub_repository_with_a_subfolder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = tmp_path / "snapshot"
    _lay_out(snapshot / "models")
    asked: dict[str, Any] = {}

    def fake_download(repo_id: str, **kwargs: Any) -> str:
        asked.update(repo_id=repo_id, **kwargs)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    folder, weight = ip_adapter_files("h94/IP-Adapter/models")
    assert (folder, weight) == (snapshot / "models", IP_ADAPTER_WEIGHT_NAME)
    assert asked["repo_id"] == "h94/IP-Adapter"
    # Only what the worker loads, not every variant in the repository.
    assert asked["allow_patterns"] == ["models/*.safetensors", "models/image_encoder/*"]


def test_an_unreachable_hub_is_a_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(repo_id: str, **kwargs: Any) -> str:
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelError, match="cannot fetch 'h94/IP-Adapter/models'"):
        ip_adapter_files("h94/IP-Adapter/models")


def test_a_missing_local_path_is_still_reported_as_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        ip_adapter_files(tmp_path / "nowhere" / "models")
