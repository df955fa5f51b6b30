"""``imageq gateway`` (serve the HTTP API) and ``imageq tokens`` (tenants and tokens)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import redis

from imageq.api_client.errors import ImageqError
from imageq.api_client.records import RecordStore, connect
from imageq.api_client.settings import Settings


def gateway_main(argv: list[str]) -> int:
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(
        prog="imageq gateway", description="serve the HTTP API (docs/design.md, HTTP gateway)"
    )
    parser.add_argument("--host", default=settings.gateway_host)
    parser.add_argument("--port", type=int, default=settings.gateway_port)
    parser.add_argument("--log-level", default=settings.log_level.lower())
    parser.add_argument(
        "--http",
        choices=("httptools", "h11"),
        default="httptools",
        help="HTTP parser: httptools (fast, C) or h11 (pure Python)",
    )
    parser.add_argument(
        "--forwarded-allow-ips",
        default=settings.gateway_forwarded_allow_ips,
        help="the load balancer's addresses, whose X-Forwarded-For is trusted "
        "(comma-separated; default IMAGEQ_GATEWAY_FORWARDED_ALLOW_IPS)",
    )
    args = parser.parse_args(argv)

    import uvicorn

    from imageq.gateway.app import create_app
    from imageq.gateway.server import PROTOCOLS

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(
            settings.metrics_port, settings.metrics_address, registry=app.state.metrics.registry
        )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        # uvicorn's own protocol, plus a deadline on each request head (slowloris).
        http=PROTOCOLS[args.http],
        # Past this many connections uvicorn answers 503 at once.
        limit_concurrency=settings.gateway_max_connections,
        # h11's own cap on a request head; the app caps headers again for httptools.
        h11_max_incomplete_event_size=settings.gateway_max_header_bytes,
        forwarded_allow_ips=args.forwarded_allow_ips,
        proxy_headers=True,
        server_header=False,
        # Idle keep-alive connections, and request heads still arriving, close after it.
        timeout_keep_alive=settings.gateway_idle_timeout_s,
        # SIGTERM: stop taking connections, let requests in progress end (waits and
        # event streams included, up to this long), then exit.
        timeout_graceful_shutdown=10,
    )
    return 0


def _tokens_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imageq tokens", description="gateway tenants and tokens")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("create", help="a new token for TENANT (printed once, stored as a hash)")
    p.add_argument("tenant")
    p.add_argument("--rate", type=float, help="jobs per second (0: no limit)")
    p.add_argument("--max-in-flight", type=int, help="jobs not yet final (0: no limit)")
    p.add_argument("--max-priority", type=int, help="the highest job priority it may ask for (0-9)")
    p.add_argument(
        "--allow-prefix",
        action="append",
        metavar="URI",
        help="an s3://bucket/path/ or file:///path/ the tenant's jobs may read (repeatable; "
        "replaces its grants; '' withdraws them all)",
    )
    p = sub.add_parser("list", help="tenants, their limits, grants and token prefixes")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("revoke", help="every token of TENANT, or the token TOKEN_PREFIX begins")
    p.add_argument("what", metavar="TENANT|TOKEN_PREFIX")
    return parser


def tokens_main(argv: list[str]) -> int:
    from imageq.gateway.tokens import TokenStore

    args = _tokens_parser().parse_args(argv)
    settings = Settings.from_env()
    client = connect(settings.records_redis_url)
    tokens = TokenStore(client, RecordStore(client, settings))
    try:
        if args.action == "create":
            grants = None
            if args.allow_prefix is not None:
                grants = [p for p in args.allow_prefix if p]
            token = tokens.create(
                args.tenant, args.rate, args.max_in_flight, args.max_priority, grants
            )
            print(token)
            print(
                f"imageq: a token for tenant {args.tenant!r}; it is shown this once "
                "(only its hash is stored)",
                file=sys.stderr,
            )
            return 0
        if args.action == "list":
            tenants = tokens.tenants()
            if args.json:
                print(json.dumps(tenants, indent=2))
            else:
                print(_format(tenants, settings))
            return 0
        revoked = tokens.revoke(args.what)
        if not revoked:
            print(f"imageq: no tenant or token matches {args.what!r}", file=sys.stderr)
            return 1
        for prefix in revoked:
            print(f"revoked {prefix}…")
        return 0
    except ImageqError as exc:
        print(f"imageq: {exc.message}", file=sys.stderr)
        return 2
    except redis.RedisError as exc:
        print(f"imageq: cannot reach Redis: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()


def _format(tenants: list[dict[str, object]], settings: Settings) -> str:
    if not tenants:
        return "(no tenants)"
    rows = [["tenant", "rate/s", "max in flight", "max priority", "tokens", "allowed prefixes"]]
    for t in tenants:
        rate = (
            t["rate"] if t["rate"] is not None else f"{settings.gateway_default_rate:g} (default)"
        )
        cap = (
            t["max_in_flight"]
            if t["max_in_flight"] is not None
            else f"{settings.gateway_default_max_in_flight} (default)"
        )
        top = (
            t["max_priority"]
            if t["max_priority"] is not None
            else f"{settings.gateway_default_max_priority} (default)"
        )
        shown = ", ".join(f"{tok['prefix']}…" for tok in t["tokens"]) or "(revoked)"  # type: ignore[attr-defined]
        granted = t.get("allow_prefixes")
        grants = (
            ", ".join(str(p) for p in granted) if isinstance(granted, list) and granted else "-"
        )
        rows.append([str(t["tenant"]), str(rate), str(cap), str(top), shown, grants])
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
