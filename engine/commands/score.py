"""`crmflow score ...` (apply, list, show, run) and `crmflow relation ...` (add, list,
remove): scorecards and the related tables their aggregates read (docs/scorecards.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import psycopg
from rich.table import Table

from engine.commands.common import CliError, console, dump_json, err, with_conn
from engine.commands.workflow import load_definitions
from engine.scorecards import relations, store
from engine.scorecards.model import ScorecardError


class _Rollback(Exception):
    pass


def cmd_score_apply(args: argparse.Namespace) -> int:
    definitions = [
        (Path(f), i, d) for f in args.files for i, d in enumerate(load_definitions(Path(f)))
    ]

    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        results: list[tuple[str, store.SaveResult]] = []
        problems: list[str] = []
        async with conn.transaction():  # all or nothing
            for path, index, definition in definitions:
                where = f"{path}" + (f"[{index}]" if len(definitions) > 1 else "")
                try:
                    async with conn.transaction():
                        results.append((where, await store.apply(conn, definition)))
                except ScorecardError as exc:
                    problems += [f"{where}: {issue}" for issue in exc.issues]
            if problems:
                for p in problems:
                    err.print(f"[red]error[/] {p}", highlight=False, markup=False)
                err.print("nothing was applied")
                raise _Rollback
        for where, r in results:
            what = "created" if r.created else ("new version" if r.changed else "unchanged")
            console.print(
                f"{where}: scorecard {r.name} v{r.version} {what}",
                highlight=False,
                markup=False,
                soft_wrap=True,  # one line per scorecard, however long its path
            )
        return 0

    try:
        return asyncio.run(with_conn(run))
    except _Rollback:
        return 1


def cmd_score_list(args: argparse.Namespace) -> int:
    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        rows = await store.list_scorecards(conn)
        if args.json:
            dump_json(rows)
            return 0
        table = Table("name", "entity", "status", "version", "schedule", "realtime", "scored")
        for r in rows:
            levels = ", ".join(f"{k} {v}" for k, v in (r["levels"] or {}).items())
            table.add_row(
                r["name"],
                r["entity_type"],
                r["status"],
                str(r["current_version"]),
                r["schedule"] or "-",
                "yes" if r["realtime"] else "no",
                f"{r['scored']}" + (f" ({levels})" if levels else ""),
            )
        console.print(table)
        return 0

    return asyncio.run(with_conn(run))


def _not_found(name: str) -> CliError:
    return CliError(f"no scorecard named {name!r} (crmflow score list)")


def cmd_score_show(args: argparse.Namespace) -> int:
    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        try:
            card = await store.get(conn, args.name)
        except store.ScorecardNotFound:
            raise _not_found(args.name) from None
        if args.sql:
            from engine.scorecards.compile import compile_scoring

            loaded = await store.load(conn, args.name)
            card["sql"] = compile_scoring(loaded, keyed=False).as_string(conn)
        if args.json:
            dump_json(card)
            return 0
        console.print(
            f"[bold]{card['name']}[/] ({card['entity_type']}, v{card['current_version']}, "
            f"{card['status']}, schedule {card['schedule'] or 'none'}, "
            f"real time {'on' if card['realtime'] else 'off'})",
            highlight=False,
        )
        console.print_json(json.dumps(card["definition"]))
        console.print(
            "versions: "
            + ", ".join(
                f"v{v['version']} {v['created_at']:%Y-%m-%d %H:%M}" for v in card["versions"]
            ),
            highlight=False,
        )
        if args.sql:
            console.print(card["sql"], highlight=False, markup=False)
        return 0

    return asyncio.run(with_conn(run))


def _key(text: str) -> dict[str, Any]:
    """``42``, ``abc`` or a JSON object (composite keys) → a key object's value."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {"__value__": text}
    if isinstance(value, dict):
        return value
    return {"__value__": value}


def cmd_score_run(args: argparse.Namespace) -> int:
    from engine.scorecards import run as runs

    async def body(conn: psycopg.AsyncConnection[Any]) -> int:
        try:
            card = await store.load(conn, args.name)
        except store.ScorecardNotFound:
            raise _not_found(args.name) from None
        keys: list[dict[str, Any]] | None = None
        if args.key:
            pk = card.entity.pk_columns
            keys = []
            for raw in args.key:
                k = _key(raw)
                if "__value__" in k:
                    if len(pk) != 1:
                        raise CliError(
                            f"{card.entity.entity_type} has a composite key "
                            f"({', '.join(pk)}): give --key as a JSON object"
                        )
                    k = {pk[0]: k["__value__"]}
                if set(k) != set(pk):
                    raise CliError(f"--key {raw}: the key of {card.entity.entity_type} is {pk}")
                keys.append(k)
        try:
            result = await runs.score(conn, card, keys)
        except runs.ScoringYielded as exc:
            raise CliError(
                f"scorecard {args.name}: {exc} (a schema change of the CRM, say); "
                "nothing was written: run it again"
            ) from None
        if args.json:
            dump_json(result.as_dict())
            return 0
        console.print(
            f"scorecard {result.scorecard} v{result.version}: scored {result.scored}, "
            f"wrote {result.updated}, {result.level_changes} level change(s), "
            f"{result.history_rows} history row(s)"
            + (
                f", {result.skipped_locked} row(s) locked (next run)"
                if result.skipped_locked
                else ""
            )
            + f" in {result.seconds:.2f}s",
            highlight=False,
            soft_wrap=True,
        )
        return 0

    return asyncio.run(with_conn(body))


def cmd_relation_add(args: argparse.Namespace) -> int:
    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        try:
            r = await relations.add_relation(
                conn, args.table, args.entity, args.key, args.time_column, args.name
            )
        except ScorecardError as exc:
            raise CliError(str(exc)) from None
        console.print(
            f"relation {r['name']}: {r['related_entity_type']} rows belong to "
            f"{r['entity_type']} by {r['key_column']}"
            + (f", in time by {r['time_column']}" if r["time_column"] else ""),
            highlight=False,
            markup=False,
        )
        return 0

    return asyncio.run(with_conn(run))


def cmd_relation_list(args: argparse.Namespace) -> int:
    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        rows = await relations.list_relations(conn, args.entity)
        if args.json:
            dump_json(rows)
            return 0
        table = Table("entity", "name", "table", "key column", "time column")
        for r in rows:
            table.add_row(
                r["entity_type"],
                r["name"],
                f"{r['table_schema']}.{r['table_name']}" if r["table_name"] else "(unwatched)",
                r["key_column"],
                r["time_column"] or "-",
            )
        console.print(table)
        return 0

    return asyncio.run(with_conn(run))


def cmd_relation_remove(args: argparse.Namespace) -> int:
    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        try:
            removed = await relations.remove_relation(conn, args.entity, args.name)
        except ScorecardError as exc:
            raise CliError(str(exc)) from None
        if not removed:
            raise CliError(f"{args.entity} has no relation {args.name!r}")
        console.print(f"relation {args.name} removed", highlight=False, markup=False)
        return 0

    return asyncio.run(with_conn(run))


def register(sub: Any) -> Any:
    """Add `score` and `relation`; returns the `score` subcommands' subparsers, so other
    modules can add theirs (`score fit`)."""
    sc = sub.add_parser("score", help="scorecards: apply, list, show, run").add_subparsers(
        dest="score_command", required=True, metavar="SUBCOMMAND"
    )
    p = sc.add_parser("apply", help="create or update scorecards from JSON/YAML files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_score_apply)
    p = sc.add_parser("list", help="list scorecards")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_score_list)
    p = sc.add_parser("show", help="show a scorecard, its versions (and its SQL with --sql)")
    p.add_argument("name")
    p.add_argument("--sql", action="store_true", help="print the compiled scoring statement")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_score_show)
    p = sc.add_parser("run", help="score the whole table, or some entities, now")
    p.add_argument("name")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="every entity (the default)")
    which.add_argument(
        "--key",
        action="append",
        metavar="ID",
        help="an entity's key (repeatable; JSON if composite)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_score_run)

    rel = sub.add_parser(
        "relation", help="related tables of an entity, for scorecard aggregates"
    ).add_subparsers(dest="relation_command", required=True, metavar="SUBCOMMAND")
    p = rel.add_parser("add", help="declare that a table's rows belong to an entity")
    p.add_argument("table", help="the related table (watched if it is not yet)")
    p.add_argument("--entity", required=True, help="the entity its rows belong to")
    p.add_argument("--key", required=True, help="the column holding the entity's key")
    p.add_argument("--time-column", help="the date/timestamp column aggregates window on")
    p.add_argument("--name", help="the relation's name in factors (default: the table's)")
    p.set_defaults(func=cmd_relation_add)
    p = rel.add_parser("list", help="list relations")
    p.add_argument("--entity")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_relation_list)
    p = rel.add_parser("remove", help="forget a relation (not while a scorecard reads it)")
    p.add_argument("entity")
    p.add_argument("name")
    p.set_defaults(func=cmd_relation_remove)
    return sc
