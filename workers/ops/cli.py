"""Worker-side commands: ``imageq worker``, ``imageq demo``, ``imageq fleet``, ``imageq flower``,
``imageq provenance`` and ``imageq verify``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from imageq.api_client.names import WORKER_KINDS
from imageq.api_client.settings import Settings, SettingsError, process_environment
from imageq.workers.ops.launch import WorkerSpec, exec_worker


def _worker(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    spec = WorkerSpec(
        kind=args.kind,
        device=args.device,
        name=args.name or "",
        queues=tuple(q for q in (args.queues or "").split(",") if q),
        concurrency=args.concurrency or 0,
        loglevel=args.loglevel,
    )
    exec_worker(spec, settings, process_environment())
    return 0  # not reached: exec replaced this process


def _demo(args: argparse.Namespace) -> int:
    from imageq.workers.testing.demo import run_demo

    return run_demo(tiny=args.tiny, timeout_s=args.timeout_s)


def _delegate(target: str) -> Callable[[argparse.Namespace], int]:
    """Subcommands whose options their own module parses (``module:function``)."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        module_name, func = target.split(":")
        return int(getattr(importlib.import_module(module_name), func)(args.rest))

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imageq")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("worker", help="start one worker holding one warm model")
    p.add_argument("kind", choices=WORKER_KINDS)
    p.add_argument("--device", default="auto", help="cpu, cuda:N or auto")
    p.add_argument("--queues", help="comma-separated queues (default: the kind's own)")
    p.add_argument("--name", help="node name (default KIND@gpuN or KIND@host)")
    p.add_argument("--concurrency", type=int, help="jobs in flight (default by kind)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=_worker)

    p = sub.add_parser("demo", help="run one caption job end to end on a sample image")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="offline: a tiny random BLIP of the real architecture (meaningless captions)",
    )
    p.add_argument("--timeout-s", type=float, default=600)
    p.set_defaults(func=_demo)

    p = sub.add_parser("fleet", help="one worker per GPU from a config file", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_delegate("imageq.workers.ops.fleet:main"))

    p = sub.add_parser("flower", help="Flower on the imageq app, behind basic auth", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_delegate("imageq.workers.ops.flower:main"))

    for name, help_text in _GATEWAY_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_delegate(f"imageq.gateway.cli:{name}_main"))
    for name, help_text in _PROVENANCE_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_delegate(f"imageq.workers.provenance.cli:{name}_main"))
    return parser


# The HTTP gateway's commands parse their own options (gateway/cli.py).
_GATEWAY_COMMANDS = {
    "gateway": "serve the HTTP API (needs imageq[server])",
    "tokens": "gateway tenants and their tokens: create, list, revoke",
}

# C2PA provenance (workers/provenance/cli.py): c2pa and cryptography come with imageq[worker].
_PROVENANCE_COMMANDS = {
    "provenance": "provenance init [DIR]: a development C2PA signing chain",
    "verify": "verify FILE: print a file's C2PA manifest and whether it validates",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        # argparse.REMAINDER refuses a leading "--option" after a subcommand, so the
        # delegated commands get their arguments untouched.
        if argv and argv[0] in ("fleet", "flower"):
            run = _delegate(f"imageq.workers.ops.{argv[0]}:main")
            return int(run(argparse.Namespace(rest=argv[1:])))
        if argv and argv[0] in _GATEWAY_COMMANDS:
            run = _delegate(f"imageq.gateway.cli:{argv[0]}_main")
            return int(run(argparse.Namespace(rest=argv[1:])))
        if argv and argv[0] in _PROVENANCE_COMMANDS:
            run = _delegate(f"imageq.workers.provenance.cli:{argv[0]}_main")
            return int(run(argparse.Namespace(rest=argv[1:])))
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except SettingsError as exc:
        # A bad IMAGEQ_* value is the operator's to fix: the variable, not a traceback.
        print(f"imageq: {exc}", file=sys.stderr)
        return 2
