"""`crmflow apikey ...`: the management API's keys."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import psycopg
from rich.table import Table

from engine.commands.common import (
    CliError,
    console,
    dump_json,
    err,
    with_conn,
)


def cmd_apikey_create(args: argparse.Namespace) -> int:
    from engine import apikeys

    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        try:
            row, key = await apikeys.create(conn, args.name, args.scope)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        if args.json:
            dump_json({**row, "key": key})
            return 0
        err.print(
            f"API key {row['id']} [bold]{row['name']}[/] ({row['scope']}) created; "
            "it is shown this once, store it now:",
            highlight=False,
        )
        sys.stdout.write(key + "\n")
        return 0

    return asyncio.run(with_conn(run))


def cmd_apikey_list(args: argparse.Namespace) -> int:
    from engine import apikeys

    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        rows = await apikeys.list_keys(conn, include_revoked=not args.live)
        if args.json:
            dump_json(rows)
            return 0
        table = Table("id", "name", "prefix", "scope", "created", "last used", "revoked")
        for r in rows:
            table.add_row(
                str(r["id"]),
                r["name"],
                f"cf_{r['prefix']}_…",
                r["scope"],
                r["created_at"].isoformat(timespec="seconds"),
                r["last_used_at"].isoformat(timespec="seconds") if r["last_used_at"] else "-",
                r["revoked_at"].isoformat(timespec="seconds") if r["revoked_at"] else "",
            )
        console.print(table)
        return 0

    return asyncio.run(with_conn(run))


def cmd_apikey_revoke(args: argparse.Namespace) -> int:
    from engine import apikeys

    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        try:
            row = await apikeys.revoke(conn, args.id)
        except apikeys.ApiKeyNotFound:
            raise CliError(f"no API key {args.id}") from None
        console.print(f"API key {row['id']} {row['name']}: revoked", highlight=False)
        return 0

    return asyncio.run(with_conn(run))


def register(sub: Any) -> None:
    """Add these commands to the top-level subparsers."""
    keys = sub.add_parser("apikey", help="API keys of the management API").add_subparsers(
        dest="apikey_command", required=True, metavar="SUBCOMMAND"
    )
    p = keys.add_parser("create", help="create an API key (printed once)")
    p.add_argument("--name", required=True, help="who or what uses the key")
    p.add_argument(
        "--scope",
        required=True,
        choices=("read", "write", "admin"),
        help="read < write < admin",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_apikey_create)
    p = keys.add_parser("list", help="list API keys (never the keys themselves)")
    p.add_argument("--live", action="store_true", help="leave out revoked keys")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_apikey_list)
    p = keys.add_parser("revoke", help="revoke an API key")
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_apikey_revoke)
