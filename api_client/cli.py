"""The ``imageq`` command line.

Client commands (submit, get, wait, cancel, list, status, adapters) run here with the
light install. Worker-side commands (worker, fleet, demo, flower, provenance, verify, and
the HTTP gateway's gateway and tokens) run ``python -m workers``, which needs the
``imageq[worker]`` extra (``imageq[server]`` for the gateway's); this module never
imports it.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
import zipfile
from dataclasses import asdict
from datetime import date
from pathlib import Path
from typing import Any

from imageq.api_client.client import Client
from imageq.api_client.errors import ImageqError, InvalidInput, NotFound
from imageq.api_client.image_header import image_size
from imageq.api_client.kinds import KINDS
from imageq.api_client.object_urls import storage_root
from imageq.api_client.progress import ProgressBar
from imageq.api_client.records import parse_time
from imageq.api_client.schemas import JobRecord
from imageq.api_client.settings import Settings, SettingsError
from imageq.api_client.uploads import (
    IMAGE_TYPES,
    dataset_key,
    put_object,
    sniff_format,
    write_atomic,
)
from imageq.api_client.webhook_log import KeptOutcome, parse_since

WORKER_COMMANDS = (
    "worker",
    "fleet",
    "demo",
    "flower",
    "gateway",
    "tokens",
    "provenance",
    "verify",
)


def image_ref(arg: str, client: Client) -> str:
    """A URL or reference passes through; a local file travels inline when small, else
    it is uploaded to the deployment's storage (``storage://uploads/...``).

    A file the workers would refuse (over their byte or pixel cap, not an image) is
    refused here, naming the cap, before anything is sent.
    """
    if "://" in arg or arg.startswith("data:"):
        return arg
    path = Path(arg)
    if not path.is_file():
        raise ImageqError(f"image: {arg} is neither a URL nor a readable file")
    settings = client.settings
    size = path.stat().st_size
    if size > settings.max_image_bytes:
        raise InvalidInput(
            f"image: {arg} is {size} bytes, over the workers' limit of "
            f"{settings.max_image_bytes} bytes (IMAGEQ_MAX_IMAGE_BYTES)"
        )
    data = path.read_bytes()
    fmt = sniff_format(data)
    if fmt is None:
        raise InvalidInput(f"image: {arg} is not a JPEG, PNG, WebP, GIF or BMP image")
    dims = image_size(data)
    if dims is not None and dims[0] * dims[1] > settings.max_image_pixels:
        raise InvalidInput(
            f"image: {arg} is {dims[0]}x{dims[1]} = {dims[0] * dims[1]} pixels, over the "
            f"workers' limit of {settings.max_image_pixels} (IMAGEQ_MAX_IMAGE_PIXELS)"
        )
    if len(data) <= settings.max_data_uri_bytes:
        mime = IMAGE_TYPES[fmt][0]
        return f"data:{mime};base64,{base64.b64encode(data).decode()}"
    return client.upload(data, IMAGE_TYPES[fmt][0])


def dataset_ref(arg: str, settings: Settings) -> str:
    """A dataset reference passes through; a local folder (images + ``metadata.jsonl``)
    is zipped and a local zip or tar archive read, then either is put into the
    deployment's storage and named by its storage URI, which the workers read."""
    if "://" in arg:
        return arg
    path = Path(arg)
    if path.is_dir():
        if not any(path.rglob("metadata.jsonl")):
            raise InvalidInput(f"dataset: {arg} holds no metadata.jsonl (docs/finetune.md)")
        data = zip_folder(path, settings.max_dataset_bytes)
    elif path.is_file():
        if path.stat().st_size > settings.max_dataset_bytes:
            raise InvalidInput(_over_dataset_cap(arg, settings.max_dataset_bytes))
        data = path.read_bytes()
    else:
        raise ImageqError(f"dataset: {arg} is neither a URL, a folder nor an archive")
    key = dataset_key()
    put_object(settings, key, data, "application/zip")
    return storage_root(settings) + key


def zip_folder(folder: Path, max_bytes: int) -> bytes:
    """``folder``'s files as a zip (names relative to it); refused past ``max_bytes``.

    Images are stored as they are (JPEG and PNG are compressed already); the rest is
    deflated.
    """
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = path.relative_to(folder).as_posix()
            if any(part.startswith(".") for part in name.split("/")):
                continue  # .DS_Store, .git: never part of a dataset
            with path.open("rb") as f:
                stored = sniff_format(f.read(16)) is not None
            method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
            archive.write(path, name, compress_type=method)
            if out.tell() > max_bytes:
                raise InvalidInput(_over_dataset_cap(str(folder), max_bytes))
    return out.getvalue()


def _over_dataset_cap(arg: str, max_bytes: int) -> str:
    return (
        f"dataset: {arg} is over the workers' limit of {max_bytes} bytes (IMAGEQ_MAX_DATASET_BYTES)"
    )


def _print(record: JobRecord | dict[str, Any] | list[Any]) -> int:
    if isinstance(record, JobRecord):
        record = record.to_json()
    print(json.dumps(record, indent=2))
    return 0


def _wait(
    client: Client, job_id: str, timeout_s: float | None, preview: Path | None = None
) -> JobRecord:
    bar = ProgressBar(sys.stderr)
    keep = PreviewFile(client, job_id, preview) if preview is not None else None

    def update(record: JobRecord) -> None:
        bar.update(record)
        if keep is not None:
            keep.update(record)

    try:
        return client.wait(job_id, timeout_s, on_update=update)
    finally:
        bar.close()


class PreviewFile:
    """``get --follow --preview FILE``: the job's latest step preview kept at ``path``,
    replaced whole (a viewer never reads half a JPEG) each time ``progress.preview``
    names a new one."""

    def __init__(self, client: Client, job_id: str, path: Path) -> None:
        self.client, self.job_id, self.path = client, job_id, path
        self._last: Any = None
        self.saved = 0

    def update(self, record: JobRecord) -> None:
        shown = (record.progress or {}).get("preview")
        if not shown or shown == self._last:
            return
        data = self.client.preview(self.job_id)
        if data is not None:
            self._last = shown
            write_atomic(self.path, data)
            self.saved += 1


def _submit(args: argparse.Namespace, client: Client) -> int:
    inp: dict[str, Any] = json.loads(args.input) if args.input else {}
    if args.kind == "finetune" and args.images:
        if len(args.images) != 1:
            raise InvalidInput("finetune: give one dataset (a folder, an archive or a URL)")
        inp["dataset"] = dataset_ref(args.images[0], client.settings)
    elif args.images:
        refs = [image_ref(i, client) for i in args.images]
        if args.kind in ("caption", "match"):
            inp["images"] = refs
        else:
            inp["image"] = refs[0]
            if len(refs) > 1:
                inp["mask" if args.kind == "inpaint" else "style_image"] = refs[1]
    if args.prompt is not None:
        inp["prompt"] = args.prompt
    if args.text:
        inp["texts"] = args.text
    if args.attention:
        inp["attention"] = True
    webhook: dict[str, Any] | None = None
    if args.webhook:
        webhook = {"url": args.webhook}
        if args.events:
            webhook["events"] = args.events.split(",")
    record = client.submit(
        args.kind,
        inp,
        webhook=webhook,
        idempotency_key=args.idempotency_key,
        priority=args.priority,
        timeout_s=args.timeout_s,
    )
    if not args.wait:
        print(record.id)
        return 0
    final = _wait(client, record.id, args.wait_timeout_s)
    _print(final)
    return 0 if final.status == "succeeded" else 1


def _get(args: argparse.Namespace, client: Client) -> int:
    record = client.get(args.id, presign=args.urls)
    preview = Path(args.preview) if args.preview else None
    if (args.follow or preview is not None) and not record.is_final:
        record = _wait(client, args.id, None, preview)
        if args.urls:
            record = client.get(args.id, presign=True)
    _print(record)
    return 0


def _list(args: argparse.Namespace, client: Client) -> int:
    records = client.list(args.status, args.kind, args.limit)
    if args.json:
        return _print([r.to_json() for r in records])
    print(format_jobs(records, time.time()))
    return 0


def format_jobs(records: list[JobRecord], now: float) -> str:
    """One line per job: id, kind, status, age, run time, error code."""
    rows = [["id", "kind", "status", "age", "run", "error"]]
    for r in records:
        created = parse_time(r.created_at)
        run_s = r.metrics.get("run_s")
        rows.append(
            [
                r.id,
                r.kind,
                str(r.status),
                "-" if created is None else _age(now - created),
                "-" if run_s is None else f"{float(run_s):.2f}s",
                r.error.code if r.error is not None else "",
            ]
        )
    if len(rows) == 1:
        return "(no jobs)"
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{max(0.0, seconds):.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def _since(value: str | None) -> float | None:
    try:
        return None if value is None else parse_since(value)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


def _webhooks_list(args: argparse.Namespace, client: Client) -> int:
    outcome = KeptOutcome.FAILED if args.failed else KeptOutcome.GONE if args.gone else None
    kept = client.failed_webhooks(outcome, _since(args.since), args.limit)
    return _print([k.model_dump(mode="json") for k in kept])


def _webhooks_replay(args: argparse.Namespace, client: Client) -> int:
    if (args.id is None) == (args.job is None and args.since is None):
        raise InvalidInput("replay: give a webhook id, or --job JOB and/or --since TIME")
    sent = client.replay_webhooks(args.id, job_id=args.job, since=_since(args.since))
    if args.id is not None and not sent:
        raise NotFound(f"webhook {args.id!r}: no kept delivery with that id")
    return _print({"replayed": sent})


def _usage(args: argparse.Namespace, client: Client) -> int:
    try:
        since = None if args.since is None else date.fromisoformat(args.since)
    except ValueError:
        raise InvalidInput(f"since: {args.since!r} is not a date (YYYY-MM-DD)") from None
    return _print([asdict(row) for row in client.usage(args.tenant, since)])


def _errors_show(args: argparse.Namespace, client: Client) -> int:
    detail = client.error_detail(args.error_id)
    if detail is None:
        raise NotFound(f"error {args.error_id!r}: no detail kept (unknown, or expired)")
    return _print(detail)


def _status(args: argparse.Namespace, client: Client) -> int:
    from imageq.api_client.status import render_status

    print(render_status(client))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imageq", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("submit", help="submit a job")
    p.add_argument("kind", choices=KINDS)
    p.add_argument(
        "images",
        nargs="*",
        help="image URLs or local files (sent inline); finetune: a dataset folder "
        "(images + metadata.jsonl, zipped and uploaded), archive or URL",
    )
    p.add_argument("--prompt")
    p.add_argument("--text", action="append", help="a text to match (repeatable)")
    p.add_argument("--attention", action="store_true", help="caption: return attention maps")
    p.add_argument("--input", help="the kind's input fields as JSON")
    p.add_argument("--webhook", help="URL to post signed events to")
    p.add_argument("--events", help="comma-separated webhook events")
    p.add_argument("--idempotency-key")
    p.add_argument("--priority", type=int, default=5)
    p.add_argument("--timeout-s", type=float)
    p.add_argument("--wait", action="store_true", help="wait for the result and print it")
    p.add_argument("--wait-timeout-s", type=float)
    p.set_defaults(func=_submit)

    p = sub.add_parser("get", help="print a job's record")
    p.add_argument("id")
    p.add_argument("--follow", action="store_true", help="show progress until it ends")
    p.add_argument(
        "--preview",
        metavar="FILE",
        help="while following, keep the latest step preview (JPEG) of a diffusion job in FILE",
    )
    p.add_argument(
        "--urls", action="store_true", help="sign fresh URLs for the stored outputs (S3)"
    )
    p.set_defaults(func=_get)

    p = sub.add_parser("wait", help="wait for a job to end")
    p.add_argument("id")
    p.add_argument("--timeout-s", type=float)
    p.set_defaults(func=lambda a, c: _print(_wait(c, a.id, a.timeout_s)))

    p = sub.add_parser("cancel", help="cancel a job in any state")
    p.add_argument("id")
    p.set_defaults(func=lambda a, c: _print(c.cancel(a.id)))

    p = sub.add_parser("list", help="recent jobs")
    p.add_argument("--status")
    p.add_argument("--kind")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true", help="print the whole records as JSON")
    p.set_defaults(func=_list)

    p = sub.add_parser("webhooks", help="deliveries that failed for good; send them again")
    hooks = p.add_subparsers(dest="action", required=True)
    q = hooks.add_parser("list", help="kept deliveries, newest first")
    which = q.add_mutually_exclusive_group()
    which.add_argument("--failed", action="store_true", help="retries spent")
    which.add_argument("--gone", action="store_true", help="the receiver answered 410")
    q.add_argument("--since", help="ISO 8601 time, or an age: 30m, 2h, 7d")
    q.add_argument("--limit", type=int, default=100)
    q.set_defaults(func=_webhooks_list)
    q = hooks.add_parser("replay", help="send kept deliveries again (same webhook id)")
    q.add_argument("id", nargs="?", help="a webhook id from `imageq webhooks list`")
    q.add_argument("--job", help="every kept delivery of this job")
    q.add_argument("--since", help="every kept delivery since: ISO 8601 time, or 30m, 2h, 7d")
    q.set_defaults(func=_webhooks_replay)

    p = sub.add_parser("errors", help="what an internal error's id stands for (operators)")
    errs = p.add_subparsers(dest="action", required=True)
    q = errs.add_parser("show", help="the detail kept for an error id")
    q.add_argument("error_id")
    q.set_defaults(func=_errors_show)

    p = sub.add_parser("status", help="queues, depths and live workers")
    p.set_defaults(func=_status)

    p = sub.add_parser("usage", help="model time by tenant, kind and day (UTC)")
    p.add_argument("--tenant", help="one tenant ('-': jobs submitted without one); default all")
    p.add_argument("--since", help="first day, YYYY-MM-DD (default 30 days ago)")
    p.set_defaults(func=_usage)

    p = sub.add_parser("adapters", help="published adapters")
    p.set_defaults(func=lambda a, c: _print(c.adapters()))

    for name in WORKER_COMMANDS:
        # The gateway's commands run on the light server install; the rest need torch.
        extra = "server" if name in ("gateway", "tokens") else "worker"
        sub.add_parser(name, help=f"{name} (needs imageq[{extra}])", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in WORKER_COMMANDS:
        # Replace this process: signals (Ctrl-C, SIGTERM) then reach the worker directly.
        os.execv(sys.executable, [sys.executable, "-m", "imageq.workers", *argv])
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        # A bad IMAGEQ_* value is the operator's to fix: the variable, not a traceback.
        print(f"imageq: {exc}", file=sys.stderr)
        return 2
    client = Client(settings)
    try:
        return int(args.func(args, client))
    except ImageqError as exc:
        print(f"imageq: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
