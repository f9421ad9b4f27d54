"""`crmflow suppress add/list/remove`: suppression lists (engine/suppressions.py)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
from typing import Any

import psycopg
from rich.markup import escape
from rich.table import Table

from engine.commands.common import CliError, console, dump_json, with_conn


def _who() -> str:
    try:
        return f"os:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name for this uid (a container)
        return "os:unknown"


def _target(args: argparse.Namespace) -> dict[str, Any]:
    if args.email is not None and (args.entity is not None or args.key is not None):
        raise CliError("give --entity TYPE --key ID or --email ADDR, not both")
    if args.email is None and (args.entity is None) != (args.key is None):
        raise CliError("--entity and --key go together")
    if args.email is None and args.entity is None:
        raise CliError("give --entity TYPE --key ID or --email ADDR")
    return {"entity_type": args.entity, "key": args.key, "email": args.email}


def _fail(exc: Exception) -> CliError:
    from engine.suppressions import SuppressionError

    if isinstance(exc, SuppressionError):
        return CliError("; ".join(f"--{i.path.replace('_', '-')}: {i.message}" for i in exc.issues))
    return CliError(str(exc))


def _describe(entry: dict[str, Any]) -> str:
    if entry["email"]:
        return str(entry["email"])
    return f"{entry['entity_type']} {entry['key']}"


def cmd_suppress_add(args: argparse.Namespace) -> int:
    from engine import suppressions

    target = _target(args)

    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        try:
            entry = await suppressions.add(
                conn, args.list, **target, until=args.until, reason=args.reason, who=_who()
            )
        except suppressions.SuppressionError as exc:
            raise _fail(exc) from None
        if args.json:
            dump_json(entry)
            return 0
        until = f" until {entry['until'].isoformat()}" if entry["until"] else ""
        console.print(
            f"{escape(_describe(entry))} is on the list [bold]{escape(entry['list'])}[/]{until}"
            + ("" if entry["active"] else " (already expired: it suppresses nothing)"),
            highlight=False,
        )
        return 0

    return asyncio.run(with_conn(run))


def cmd_suppress_list(args: argparse.Namespace) -> int:
    from engine import suppressions

    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        try:
            rows = await suppressions.entries(
                conn, args.list, active=True if args.active else None, limit=args.limit
            )
        except suppressions.SuppressionError as exc:
            raise _fail(exc) from None
        if args.json:
            dump_json(rows)
            return 0
        table = Table("list", "entity / email", "until", "reason", "who", "added")
        for r in rows:
            until = r["until"].isoformat(timespec="seconds") if r["until"] else "-"
            table.add_row(
                escape(r["list"]),
                escape(_describe(r)),
                until + ("" if r["active"] else " (expired)"),
                escape(r["reason"] or ""),
                escape(r["who"] or ""),
                r["created_at"].isoformat(timespec="seconds"),
            )
        console.print(table)
        return 0

    return asyncio.run(with_conn(run))


def cmd_suppress_remove(args: argparse.Namespace) -> int:
    from engine import suppressions

    target = _target(args)

    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        try:
            removed = await suppressions.remove(conn, args.list, **target)
        except suppressions.SuppressionError as exc:
            raise _fail(exc) from None
        what = args.email or f"{args.entity} {args.key}"
        if not removed:
            raise CliError(f"{what} is not on the list {args.list!r}")
        console.print(f"{escape(what)}: removed from {escape(args.list)}", highlight=False)
        return 0

    return asyncio.run(with_conn(run))


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("list", metavar="LIST", help="the list's name (e.g. unsubscribed)")
    p.add_argument("--entity", metavar="TYPE", help="an entity type (lead, account...)")
    p.add_argument(
        "--key", metavar="ID", help="the entity's key (a JSON object for a composite key)"
    )
    p.add_argument("--email", metavar="ADDR", help="an email address (compared without case)")


def register(sub: Any) -> None:
    """Add these commands to the top-level subparsers."""
    group = sub.add_parser(
        "suppress", help="suppression lists: entities and addresses kept out of workflows"
    ).add_subparsers(dest="suppress_command", required=True, metavar="SUBCOMMAND")
    p = group.add_parser("add", help="put an entity or an email address on a list")
    _target_args(p)
    p.add_argument(
        "--until",
        metavar="DATE",
        help="suppress through this date (2026-12-31) or until this ISO date-time",
    )
    p.add_argument("--reason", metavar="TEXT", help="why (shown in the list)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_suppress_add)
    p = group.add_parser("list", help="the entries of one list, or of all")
    p.add_argument("list", metavar="LIST", nargs="?", help="only this list")
    p.add_argument("--active", action="store_true", help="leave out expired entries")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_suppress_list)
    p = group.add_parser("remove", help="take an entity or an email address off a list")
    _target_args(p)
    p.set_defaults(func=cmd_suppress_remove)
