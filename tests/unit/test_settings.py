"""Settings: IMAGEQ_* parsing per type, lists, secrets, and bad values that name the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from imageq.api_client.settings import DEFAULT_WEBHOOK_SCHEDULE_S, Settings, SettingsError

ROOT = Path(__file__).resolve().parents[2]


def test_each_type_parses_from_its_variable() -> None:
    s = Settings.from_env(
        {
            "IMAGEQ_BROKER_URL": "redis://h:1/2",
            "IMAGEQ_MAX_ATTEMPTS": "7",
            "IMAGEQ_MAX_IMAGE_BYTES": " 1_000 ",
            "IMAGEQ_FETCH_TIMEOUT_S": "1e1",
            "IMAGEQ_HALF_PRECISION": "off",
            "IMAGEQ_CHANNELS_LAST": " Yes ",
            "IMAGEQ_TORCH_COMPILE": "1",
            "IMAGEQ_SAFETY_CHECKER": "false",
        }
    )
    assert s.broker_url == "redis://h:1/2"
    assert s.max_attempts == 7 and s.max_image_bytes == 1000
    assert s.fetch_timeout_s == 10.0 and isinstance(s.fetch_timeout_s, float)
    assert (s.half_precision, s.channels_last, s.torch_compile, s.safety_checker) == (
        False,
        True,
        True,
        False,
    )


def test_lists_are_comma_separated() -> None:
    s = Settings.from_env(
        {
            "IMAGEQ_WEBHOOK_SCHEDULE_S": "0,1,2",
            "IMAGEQ_WEBHOOK_EXTRA_SECRETS": "whsec_a, whsec_b,",
        }
    )
    assert s.webhook_schedule_s == (0.0, 1.0, 2.0)
    assert [x.get_secret_value() for x in s.webhook_extra_secrets] == ["whsec_a", "whsec_b"]
    # Code passes tuples, as before.
    assert Settings(webhook_schedule_s=(0.5,)).webhook_schedule_s == (0.5,)
    assert Settings().webhook_schedule_s == DEFAULT_WEBHOOK_SCHEDULE_S


def test_secrets_are_secret_strings_masked_everywhere() -> None:
    s = Settings.from_env(
        {
            "IMAGEQ_WEBHOOK_SECRET": "whsec_top",
            "IMAGEQ_FLOWER_BASIC_AUTH": "ops:pw",
            "IMAGEQ_WEBHOOK_EXTRA_SECRETS": "whsec_old",
            "IMAGEQ_FINETUNE_BROKER_URL": "redis://user:hunter2@h:6379/1",
        }
    )
    assert isinstance(s.webhook_secret, SecretStr)
    assert s.webhook_secret.get_secret_value() == "whsec_top"
    assert s.flower_basic_auth.get_secret_value() == "ops:pw"
    for shown in (repr(s), str(s), str(s.public_view())):
        assert "whsec_top" not in shown and "ops:pw" not in shown and "whsec_old" not in shown
    view = s.public_view()
    assert view["webhook_secret"] == view["flower_basic_auth"] == "***"
    assert view["webhook_extra_secrets"] == "***"
    assert view["finetune_broker_url"] == "redis://***@h:6379/1"
    unset = Settings().public_view()
    assert unset["webhook_secret"] == unset["webhook_extra_secrets"] == ""
    # Settings built in code take plain strings, as before.
    assert Settings(webhook_secret="whsec_x").webhook_secret.get_secret_value() == "whsec_x"


def test_an_empty_variable_means_the_default() -> None:
    s = Settings.from_env({"IMAGEQ_MAX_ATTEMPTS": "", "IMAGEQ_STORAGE_URL": ""})
    assert s == Settings()


def test_an_explicit_mapping_is_all_from_env_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEQ_MAX_ATTEMPTS", "9")
    monkeypatch.setenv("IMAGEQ_WEBHOOK_SECRET", "whsec_process")
    assert Settings.from_env({}) == Settings()
    assert Settings.from_env({"IMAGEQ_LEASE_TTL_S": "2"}).max_attempts == 3
    # Settings(...) in code never reads the environment either; from_env() does.
    assert Settings().max_attempts == 3
    process = Settings.from_env()
    assert process.max_attempts == 9
    assert process.webhook_secret.get_secret_value() == "whsec_process"
    # Only IMAGEQ_* names count.
    assert Settings.from_env({"MAX_ATTEMPTS": "5", "BROKER_URL": "redis://x"}) == Settings()


def test_overrides_win_and_are_validated() -> None:
    env = {"IMAGEQ_MAX_ATTEMPTS": "5", "IMAGEQ_WORKER_KIND": "caption"}
    s = Settings.from_env(env, worker_kind="webhooks", lease_ttl_s="1.5")
    assert (s.max_attempts, s.worker_kind, s.lease_ttl_s) == (5, "webhooks", 1.5)
    # A bad override is named by its field (it did not come from a variable).
    with pytest.raises(SettingsError, match=r"^invalid settings: lease_ttl_s: expected a number"):
        Settings.from_env(env, lease_ttl_s="soon")


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("IMAGEQ_MAX_ATTEMPTS", "abc", "IMAGEQ_MAX_ATTEMPTS: expected an integer, got 'abc'"),
        ("IMAGEQ_METRICS_PORT", "9.5", "IMAGEQ_METRICS_PORT: expected an integer, got '9.5'"),
        ("IMAGEQ_LEASE_TTL_S", "30s", "IMAGEQ_LEASE_TTL_S: expected a number, got '30s'"),
        (
            "IMAGEQ_ALLOW_PRIVATE_URLS",
            "maybe",
            "IMAGEQ_ALLOW_PRIVATE_URLS: expected a boolean (1/0, true/false, yes/no, on/off), "
            "got 'maybe'",
        ),
        (
            "IMAGEQ_WEBHOOK_SCHEDULE_S",
            "0,5,later",
            "IMAGEQ_WEBHOOK_SCHEDULE_S (item 3): expected a number, got 'later'",
        ),
    ],
)
def test_a_bad_value_names_the_variable_and_what_it_expects(
    name: str, raw: str, expected: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: raw})
    assert caught.value.problems == [expected]
    assert str(caught.value) == "invalid settings: " + expected
    assert isinstance(caught.value, ValueError)


def test_every_bad_variable_is_listed_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(
            {"IMAGEQ_MAX_ATTEMPTS": "x", "IMAGEQ_FETCH_TIMEOUT_S": "y", "IMAGEQ_DEVICE": "cpu"}
        )
    named = sorted(problem.split(":")[0] for problem in caught.value.problems)
    assert named == ["IMAGEQ_FETCH_TIMEOUT_S", "IMAGEQ_MAX_ATTEMPTS"]


def test_with_validates_and_settings_are_frozen() -> None:
    s = Settings()
    changed = s.with_(webhook_secret="whsec_new", webhook_extra_secrets=("whsec_old",))
    assert changed.webhook_secret.get_secret_value() == "whsec_new"
    assert changed.webhook_extra_secrets[0].get_secret_value() == "whsec_old"
    assert s.webhook_secret.get_secret_value() == ""
    with pytest.raises(SettingsError, match="max_attempts: expected an integer"):
        s.with_(max_attempts="many")
    with pytest.raises(SettingsError, match="no_such_field: no such setting"):
        s.with_(no_such_field=1)
    with pytest.raises(ValueError, match="frozen"):
        s.max_attempts = 4
    assert hash(s) == hash(Settings())


def test_every_field_is_its_imageq_variable() -> None:
    """Names (and so variables) are the contract: each one round-trips through from_env."""
    defaults = Settings()
    for name, value in defaults:
        if isinstance(value, bool):
            raw = "0" if value else "1"
        elif isinstance(value, int | float):
            raw = str(value + 1)
        elif isinstance(value, tuple):
            raw = "1,2"
        else:
            raw = "changed"
        parsed = getattr(Settings.from_env({"IMAGEQ_" + name.upper(): raw}), name)
        assert parsed != value, name


def test_model_for_names_each_worker_kinds_model() -> None:
    s = Settings(model_caption="/models/blip", model_diffusion="/models/sd")
    assert s.model_for("caption") == "/models/blip"
    assert s.model_for("finetune") == s.model_for("diffusion") == "/models/sd"
    assert s.model_for("webhooks") == ""


def _entry_point(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEQ_")}
    return subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ("-m", "imageq.workers", "worker", "caption"),  # imageq worker
        ("-m", "imageq.api_client.cli", "status"),  # imageq (client commands)
        ("-m", "imageq.api_client.cli", "flower"),  # imageq flower, through python -m workers
        ("-c", "import tasks.app"),  # what celery -A tasks.app imports
    ],
)
def test_entry_points_report_a_bad_setting_without_a_traceback(argv: tuple[str, ...]) -> None:
    done = _entry_point(*argv, IMAGEQ_MAX_ATTEMPTS="abc")
    assert done.returncode != 0
    assert "IMAGEQ_MAX_ATTEMPTS: expected an integer, got 'abc'" in done.stderr
    assert "Traceback" not in done.stderr
