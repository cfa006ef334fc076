"""The operators' subcommands of ``streambroker``: ``ls``, ``tail``, ``replay``, ``export`` and
``import``. They talk to a running broker over HTTP through ``broker.client`` (the same
reconnecting watcher Python services use), so they work against any front-end.

Where: ``--url`` (or ``STREAMBROKER_URL``, default http://127.0.0.1:8000); who:
``--api-key`` (or ``STREAMBROKER_API_KEY``) when the broker has auth on, or ``--token`` (a
read token) for ``tail``/``replay`` of one stream (export needs the key).

A broker that cannot be reached or does not answer fails a command in about ``TIMEOUT``
seconds, so that a wrong ``--url`` or a broker that is down says so at once instead of a
silent wait. ``tail`` and ``replay`` resume after drops as the client does (until five
minutes pass without a word from the broker) only once the broker has let them in;
``--wait`` makes them keep trying for ever, from the start.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from broker.cli.progress_bar import ProgressLine
from broker.client import (
    DEFAULT_URL,
    Backoff,
    Client,
    Done,
    Progress,
    StreamEvent,
    StreamFailed,
    SyncWatch,
    Token,
    ToolCall,
)
from broker.errors import ConfigError

COMMANDS = ("ls", "tail", "replay", "export", "import")
#: Seconds to connect, or to wait for the broker's next bytes, before a command fails; and
#: how long ``tail``/``replay`` retry a broker that has not answered them yet.
TIMEOUT = 10.0
#: An import is answered once the whole archive (up to 64 MB) is stored: more time for that.
IMPORT_TIMEOUT = 30.0
LS_COLUMNS = ("ID", "STATUS", "MODEL", "TENANT", "CREATED", "TTFT", "TOK/S", "TOKENS", "VIEWERS")


def add_commands(commands: Any) -> None:
    """Register the subcommands on ``streambroker``'s subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("STREAMBROKER_URL", DEFAULT_URL),
        help="the broker (default: $STREAMBROKER_URL or %(default)s)",
    )
    common.add_argument(
        "--api-key",
        default=os.environ.get("STREAMBROKER_API_KEY"),
        help="API key when auth is on (default: $STREAMBROKER_API_KEY)",
    )
    common.add_argument(
        "--timeout",
        metavar="SECONDS",
        default=os.environ.get("STREAMBROKER_TIMEOUT"),
        help=f"how long to wait for the broker before failing (default: "
        f"$STREAMBROKER_TIMEOUT, or {TIMEOUT:g}; {IMPORT_TIMEOUT:g} for import)",
    )

    ls = commands.add_parser("ls", parents=[common], help="list recent streams, newest first")
    ls.add_argument("--status", choices=["queued", "running", "completed", "failed", "cancelled"])
    ls.add_argument("--model")
    ls.add_argument(
        "--metadata", action="append", default=[], metavar="KEY=VALUE", help="repeatable"
    )
    ls.add_argument("--since", metavar="RFC3339", help="created after")
    ls.add_argument("--until", metavar="RFC3339", help="created before")
    ls.add_argument("--limit", type=int, default=20, help="rows (1-200, default 20)")
    ls.add_argument("--cursor", help="continue a previous listing")
    ls.add_argument("--all", action="store_true", help="every page, not only the first")
    ls.add_argument("--json", action="store_true", help="one JSON state per line")

    for name, text in (
        ("tail", "print a stream's answer live (resumes after drops; a progress bar on a tty)"),
        ("replay", "print a recorded stream with its original pacing, scaled by --speed"),
    ):
        watch = commands.add_parser(name, parents=[common], help=text)
        watch.add_argument("stream_id")
        watch.add_argument("--token", help="a read token for this stream instead of an API key")
        watch.add_argument("--from", dest="after", type=int, default=0, metavar="EVENT_ID")
        watch.add_argument("--events", action="store_true", help="print every event as JSON")
        watch.add_argument("--no-progress", action="store_true", help="no progress bar")
        watch.add_argument(
            "--wait",
            action="store_true",
            help=f"keep trying until the broker answers, for ever (default: fail after "
            f"{TIMEOUT:g}s without an answer)",
        )
        if name == "replay":
            watch.add_argument("--speed", type=float, default=1.0, help="0.01-1000 (default 1)")

    export = commands.add_parser(
        "export", parents=[common], help="a stream as JSON lines on stdout"
    )
    export.add_argument("stream_id")  # the API key's: a read token cannot export

    load = commands.add_parser(
        "import", parents=[common], help="import an exported stream ('-': stdin)"
    )
    load.add_argument("file")


def _timeout(given: str | None, default: float) -> float:
    """``--timeout`` (or ``STREAMBROKER_TIMEOUT``), checked: 0.1 to 3600 seconds."""
    if given is None:
        return default
    try:
        seconds = float(given)
    except ValueError:
        seconds = math.nan
    if not 0.1 <= seconds <= 3600:
        raise ConfigError(f"--timeout must be a number of seconds from 0.1 to 3600, not {given!r}")
    return seconds


def run(args: argparse.Namespace) -> int:
    """Run one of ``COMMANDS``; client errors propagate for ``cli.main`` to report."""
    token = getattr(args, "token", None)
    timeout = _timeout(args.timeout, IMPORT_TIMEOUT if args.command == "import" else TIMEOUT)
    if getattr(args, "wait", False):
        backoff = Backoff(give_up_after=None)
    else:
        backoff = Backoff(give_up_unanswered_after=timeout)
    with Client(
        args.url, api_key=args.api_key, token=token, timeout=timeout, backoff=backoff
    ) as client:
        if args.command == "ls":
            return _ls(client, args)
        if args.command in ("tail", "replay"):
            return _watch(client, args)
        if args.command == "export":
            for line in client.export(args.stream_id):
                sys.stdout.buffer.write(line)
            sys.stdout.flush()
            return 0
        return _import(client, args.file)


def _ls(client: Client, args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 200:
        raise ConfigError(f"--limit must be between 1 and 200, not {args.limit}")
    metadata = dict(_key_value(item) for item in args.metadata)
    rows: list[dict[str, Any]] = []
    cursor = args.cursor
    while True:
        page = client.list_streams(
            status=args.status,
            model=args.model,
            metadata=metadata,
            created_after=args.since,
            created_before=args.until,
            limit=args.limit,
            cursor=cursor,
        )
        rows += page.data
        cursor = page.next_cursor
        if not args.all or cursor is None:
            break
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        print_table([_ls_row(row) for row in rows], LS_COLUMNS, sys.stdout)
    if cursor is not None and not args.all:
        print(f"more: streambroker ls --cursor {cursor}", file=sys.stderr)
    return 0


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--metadata wants KEY=VALUE, not {item!r}")
    return key, value


def _ls_row(state: dict[str, Any]) -> list[str]:
    usage = state.get("usage") or {}
    return [
        state["id"],
        state["status"],
        state.get("model") or "",
        state.get("tenant") or "-",
        (state.get("created_at") or "").replace("T", " ").removesuffix("Z")[:19],
        _number(state.get("time_to_first_token_ms"), "ms"),
        _number(state.get("tokens_per_second"), ""),
        _number(usage.get("completion_tokens"), ""),
        _number(state.get("connections"), ""),
    ]


def _number(value: Any, unit: str) -> str:
    return "-" if value is None else f"{value:g}{unit}"


def print_table(rows: Iterable[list[str]], header: tuple[str, ...], out: TextIO) -> None:
    rows = list(rows)
    columns = zip(header, *rows, strict=True)
    widths = [max(len(cell) for cell in column) for column in columns]
    for row in [list(header), *rows]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip(), file=out)


def _watch(client: Client, args: argparse.Namespace) -> int:
    speed = getattr(args, "speed", None)
    watch = client.watch(args.stream_id, last_event_id=args.after, replay=speed)
    show_bar = not args.no_progress and not args.events and sys.stderr.isatty()
    bar = ProgressLine(sys.stdout, sys.stderr, enabled=show_bar)
    try:
        with watch:
            last = _print_events(watch, bar, as_json=args.events)
    finally:
        bar.close()
    return _report_end(last, watch, as_json=args.events)


def _print_events(watch: SyncWatch, bar: ProgressLine, *, as_json: bool) -> StreamEvent | None:
    last: StreamEvent | None = None
    for event in watch:
        last = event
        if as_json:
            record = {"id": event.id, "event": event.type, "data": event.data}
            print(json.dumps(record, ensure_ascii=False), flush=True)
            continue
        if isinstance(event, Token):
            bar.write(event.text)
        elif isinstance(event, ToolCall):
            bar.write(_tool_call_text(event))
        elif isinstance(event, Progress):
            bar.update(event, watch.stats.reconnects)
    return last


def _tool_call_text(event: ToolCall) -> str:
    if event.name:
        return f"\n[tool call {event.index}: {event.name}] {event.arguments}"
    return event.arguments


def _report_end(last: StreamEvent | None, watch: SyncWatch, *, as_json: bool) -> int:
    stats = watch.stats
    if last is None:
        print("streambroker: the stream had already ended at that point", file=sys.stderr)
        return 0
    if isinstance(last, StreamFailed):
        print(f"\nstreambroker: the stream failed: {last.code}: {last.message}", file=sys.stderr)
        return 1
    if isinstance(last, Done):
        if not as_json:
            print(file=sys.stdout)  # the answer's last line, ended
        if sys.stderr.isatty():
            tokens = (last.usage or {}).get("completion_tokens", "?")
            print(
                f"[{last.finish_reason} · {tokens} tokens · {stats.reconnects} reconnects]",
                file=sys.stderr,
            )
        return 0
    return 1


def _import(client: Client, path: str) -> int:
    try:
        if path == "-":
            archive = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as file:
                archive = file.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    imported = client.import_archive(archive)
    print(f"imported {imported['id']}: {imported['url']}")
    return 0
