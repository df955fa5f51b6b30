"""Every Lua script imageq runs in Redis: the files in ``lua/``, registered once per client.

A script is named by its file (``script(client, "claim")`` is ``lua/claim.lua``). A line
``-- include NAME`` stands for the file ``lua/NAME.lua``, so a piece several scripts
need (is this record final? charge a job's usage) is written once. Registering computes
the script's SHA-1 and the first call loads it (redis-py's ``Script``); each client's
scripts are kept, so no call registers one again.
"""

from __future__ import annotations

import re
import threading
from functools import cache
from importlib import resources
from typing import Any, overload
from weakref import WeakKeyDictionary

import redis
from redis.asyncio import Redis as AsyncRedis
from redis.commands.core import AsyncScript, Script

_INCLUDE = re.compile(r"^--\s*include\s+(\w+)\s*$", re.MULTILINE)

_registered: WeakKeyDictionary[Any, dict[str, Any]] = WeakKeyDictionary()
_lock = threading.Lock()


@cache
def source(name: str) -> str:
    """The script's text, its includes filled in."""
    text = resources.files(__package__ or "api_client").joinpath("lua", f"{name}.lua").read_text()
    return _INCLUDE.sub(lambda found: source(found.group(1)), text)


@overload
def script(client: AsyncRedis, name: str) -> AsyncScript: ...


@overload
def script(client: redis.Redis, name: str) -> Script: ...


def script(client: redis.Redis | AsyncRedis, name: str) -> Script | AsyncScript:
    """``lua/{name}.lua`` registered with ``client`` (a sync or an asyncio redis client):
    a ``Script`` to call with ``keys`` and ``args``; one per client and name."""
    with _lock:
        scripts = _registered.setdefault(client, {})
        found = scripts.get(name)
        if found is None:
            found = scripts[name] = client.register_script(source(name))
    return found
