"""What every command module shares: the consoles, the one-line error, JSON output, the
database URL, a connection per command and duration arguments."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import psycopg
from rich.console import Console

from engine import db
from engine.config import get_settings
from engine.embedded import resolve_database_url

console = Console()
err = Console(stderr=True)


class CliError(Exception):
    """A failure to report in one line, with exit status 1."""


def _default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def dump_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, default=_default, indent=2) + "\n")


def database_url() -> str:
    return resolve_database_url(get_settings())


async def with_conn(fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[int | None]]) -> int:
    """Run one command's body on one autocommit connection."""
    async with await db.connect(database_url(), autocommit=True) as conn:
        return (await fn(conn)) or 0


def duration_arg(text: str) -> float:
    """An argparse type: 30d, 12h, 90m or seconds."""
    from engine.durations import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def human_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
