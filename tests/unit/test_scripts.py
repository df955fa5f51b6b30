"""Every Lua script lives in api_client/lua/, is used, and is registered once per client."""

from __future__ import annotations

import re
from pathlib import Path

import redis

from imageq.api_client.scripts import script, source

ROOT = Path(__file__).resolve().parents[2]
LUA = ROOT / "api_client" / "lua"


def _python_sources() -> str:
    return "\n".join(
        p.read_text()
        for d in ("api_client", "workers", "tasks", "gateway")
        for p in (ROOT / d).rglob("*.py")
    )


def test_every_script_is_used_and_every_name_used_exists() -> None:
    code = _python_sources()
    called = set(re.findall(r'script\([^,()]+(?:\.[\w]+)*, "(\w+)"\)', code))
    included = {
        name
        for p in LUA.glob("*.lua")
        for name in re.findall(r"^-- include (\w+)$", p.read_text(), re.M)
    }
    files = {p.stem for p in LUA.glob("*.lua")}
    assert called <= files, called - files
    assert files == called | included, files - (called | included)
    # No Lua is left inline in Python: register_script is called in one place.
    assert code.count("register_script(") == 1


def test_includes_are_filled_in() -> None:
    text = source("write")
    assert "-- include" not in text
    assert "local function charge(" in text and "local STALE = " in text


def test_a_script_is_registered_once_per_client() -> None:
    client = redis.Redis()  # no connection is made until a call
    other = redis.Redis()
    assert script(client, "claim") is script(client, "claim")
    assert script(other, "claim") is not script(client, "claim")
