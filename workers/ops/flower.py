"""``imageq flower``: Flower on the imageq Celery app, only ever behind basic auth.

Flower shows every job (task ``imageq.<kind>``, task id = job id, arguments redacted by
the client's ``argsrepr``) and can revoke tasks, so it never starts open: without
``IMAGEQ_FLOWER_BASIC_AUTH`` it refuses with a message saying what to set.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from imageq.api_client.settings import Settings, process_environment

# Flower's own columns, plus the exception (a failed job's error code and message, the
# reason a canceled one was revoked) and retries (a redelivered job shows it was retried).
TASK_COLUMNS = "name,uuid,state,exception,received,started,runtime,worker,retries"

NO_AUTH_MESSAGE = (
    "imageq flower: IMAGEQ_FLOWER_BASIC_AUTH is not set. Flower shows every job and can "
    "revoke tasks, so imageq runs it only behind basic auth: set "
    "IMAGEQ_FLOWER_BASIC_AUTH=user:password (several users: user1:pw1,user2:pw2)."
)


class AuthConfigError(ValueError):
    """``IMAGEQ_FLOWER_BASIC_AUTH`` is missing or not ``user:password``."""


def check_basic_auth(value: str) -> list[str]:
    """The ``user:password`` entries of the setting; raises ``AuthConfigError`` if unusable."""
    if not value.strip():
        raise AuthConfigError(NO_AUTH_MESSAGE)
    entries = [entry.strip() for entry in value.split(",")]
    for index, entry in enumerate(entries):
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            # Never echo the entry: it may be a password with the user missing.
            raise AuthConfigError(
                f"imageq flower: IMAGEQ_FLOWER_BASIC_AUTH entry {index + 1} is not "
                "user:password (both non-empty; commas separate several users)."
            )
    return entries


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imageq flower",
        # Flower's own options pass through: never let a prefix of one match ours.
        allow_abbrev=False,
        description="Flower on the imageq app, behind basic auth (IMAGEQ_FLOWER_BASIC_AUTH). "
        "Options not listed here pass through to Flower (e.g. --purge_offline_workers=600).",
    )
    parser.add_argument("--port", type=int, default=5555, help="HTTP port (default 5555)")
    parser.add_argument(
        "--address",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 in a container)",
    )
    parser.add_argument("--url-prefix", default="", help="serve under /PREFIX behind a proxy")
    parser.add_argument(
        "--finetune",
        action="store_true",
        help="watch the finetune broker (IMAGEQ_FINETUNE_BROKER_URL) instead of the main one",
    )
    parser.add_argument(
        "--read-only", action="store_true", help="hide revoke/terminate and task-apply controls"
    )
    parser.add_argument(
        "--max-tasks", type=int, default=10000, help="tasks Flower keeps in memory (default 10000)"
    )
    return parser


def flower_argv(args: argparse.Namespace, passthrough: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "celery", "-A", "imageq.tasks.app", "flower"]
    argv += [
        f"--port={args.port}",
        f"--address={args.address}",
        f"--max_tasks={args.max_tasks}",
        f"--tasks_columns={TASK_COLUMNS}",
    ]
    if args.url_prefix:
        argv.append(f"--url_prefix={args.url_prefix.strip('/')}")
    if args.read_only:
        argv.append("--read_only=true")
    return argv + passthrough


def flower_env(settings: Settings, base: Mapping[str, str], *, finetune: bool) -> dict[str, str]:
    """The Flower process's environment; the credentials travel here, not in argv (ps)."""
    env = {k: v for k, v in base.items() if k != "FLOWER_UNAUTHENTICATED_API"}
    auth = settings.flower_basic_auth.get_secret_value()
    env["FLOWER_BASIC_AUTH"] = ",".join(check_basic_auth(auth))
    # tasks.app picks the finetune broker for a finetune worker kind; no model loads,
    # because Flower never fires worker_init.
    env["IMAGEQ_WORKER_KIND"] = "finetune" if finetune else ""
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def main(argv: list[str]) -> int:
    args, passthrough = build_parser().parse_known_args(argv)
    settings = Settings.from_env()
    try:
        env = flower_env(settings, process_environment(), finetune=args.finetune)
    except AuthConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if args.finetune and not settings.finetune_broker_url:
        print(
            "imageq flower: --finetune needs IMAGEQ_FINETUNE_BROKER_URL "
            "(finetune jobs share the main broker otherwise: drop --finetune)",
            file=sys.stderr,
        )
        return 2
    command = flower_argv(args, passthrough)
    # Replace this process so Ctrl-C and SIGTERM reach Flower directly.
    os.execve(sys.executable, command, env)
    return 0  # not reached
