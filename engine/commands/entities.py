"""`crmflow migrate`, `watch`, `unwatch`, `entities`: the schema and the watched tables."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from typing import Any

import psycopg
from rich.markup import escape
from rich.table import Table

from engine import capture
from engine.commands.common import (
    CliError,
    console,
    dump_json,
    with_conn,
)


def cmd_migrate(args: argparse.Namespace) -> int:
    from engine.migrations import MigrationError, migrate

    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        try:
            report = await migrate(conn)
        except MigrationError as exc:
            raise CliError(str(exc)) from None
        applied = ", ".join(report.applied) or "none"
        console.print(f"crmflow migrations applied: {applied}")
        if report.procrastinate:
            console.print(f"procrastinate: {', '.join(report.procrastinate)}")
        console.print(f"capture code refreshed on {report.recaptured_tables} watched table(s)")
        return 0

    return asyncio.run(with_conn(run))


def _parse_derived(items: Sequence[str] | None) -> dict[str, str]:
    derived = {}
    for item in items or []:
        name, sep, expression = item.partition("=")
        if not sep or not name.strip() or not expression.strip():
            raise CliError(f"--derived takes NAME=EXPRESSION, not {item!r}")
        derived[name.strip()] = expression.strip()
    return derived


def cmd_watch(args: argparse.Namespace) -> int:
    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        w = await capture.watch(
            conn,
            args.table,
            args.entity,
            _parse_derived(args.derived),
            all_rows=args.all_rows,
            all_columns=args.all_columns,
        )
        console.print(
            f"watching {w.table_schema}.{w.table_name} as entity [bold]{w.entity_type}[/] "
            f"(key: {', '.join(w.pk_columns)})"
        )
        return 0

    return asyncio.run(with_conn(run))


def cmd_unwatch(args: argparse.Namespace) -> int:
    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        w = await capture.unwatch(conn, args.table, force=args.force)
        console.print(f"stopped watching {w.table_schema}.{w.table_name} ({w.entity_type})")
        return 0

    return asyncio.run(with_conn(run))


def cmd_entities(args: argparse.Namespace) -> int:
    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        from engine.catalog import entity_states

        rows = await capture.list_watched(conn)
        states = {s["entity_type"]: s["state"] for s in await entity_states(conn)}
        for r in rows:
            r["state"] = states.get(r["entity_type"], "ok")
        if args.json:
            dump_json(rows)
            return 0
        table = Table("entity", "table", "key", "derived fields", "state")
        for r in rows:
            table.add_row(
                r["entity_type"],
                f"{r['table_schema']}.{r['table_name']}",
                ", ".join(r["pk_columns"]),
                ", ".join(r["derived_fields"]),
                r["state"] if r["state"] == "ok" else f"[red]{escape(r['state'])}[/]",
            )
        console.print(table)
        return 0

    return asyncio.run(with_conn(run))


def register(sub: Any) -> None:
    """Add these commands to the top-level subparsers."""
    p = sub.add_parser("migrate", help="create or upgrade the crmflow and procrastinate schemas")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("watch", help="capture writes to a table (any table with a primary key)")
    p.add_argument("table", help="table name, optionally schema-qualified")
    p.add_argument("--entity", help="entity name (default: the singular of the table)")
    p.add_argument(
        "--derived",
        action="append",
        metavar="NAME=EXPR",
        help="declare a derived field (a whitelisted SQL expression over the row)",
    )
    rows = p.add_mutually_exclusive_group()
    rows.add_argument(
        "--all-rows",
        dest="all_rows",
        action="store_const",
        const=True,
        help="capture every row (an audit trail), not only those active workflows could match",
    )
    rows.add_argument(
        "--filtered",
        dest="all_rows",
        action="store_const",
        const=False,
        help="capture only the rows active workflows could match (the default)",
    )
    columns = p.add_mutually_exclusive_group()
    columns.add_argument(
        "--all-columns",
        dest="all_columns",
        action="store_const",
        const=True,
        help="store whole rows (an audit trail), not only the key and the columns "
        "active workflows read",
    )
    columns.add_argument(
        "--pruned-columns",
        dest="all_columns",
        action="store_const",
        const=False,
        help="store only the key and the columns active workflows read (the default)",
    )
    p.set_defaults(func=cmd_watch, all_rows=None, all_columns=None)

    p = sub.add_parser("unwatch", help="stop capturing a table")
    p.add_argument("table")
    p.add_argument("--force", action="store_true", help="pause active workflows that use it")
    p.set_defaults(func=cmd_unwatch)

    p = sub.add_parser("entities", help="list watched tables")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_entities)
