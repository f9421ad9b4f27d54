"""The ``crmflow`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine import capture, db, executions, workflows
from engine.config import get_settings
from engine.embedded import resolve_database_url
from engine.model import DefinitionError

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


async def _with_conn(fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[int | None]]) -> int:
    async with await db.connect(database_url(), autocommit=True) as conn:
        return (await fn(conn)) or 0


# ───────────────────────────── migrate, watch ─────────────────────────────


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

    return asyncio.run(_with_conn(run))


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
            conn, args.table, args.entity, _parse_derived(args.derived), all_rows=args.all_rows
        )
        console.print(
            f"watching {w.table_schema}.{w.table_name} as entity [bold]{w.entity_type}[/] "
            f"(key: {', '.join(w.pk_columns)})"
        )
        return 0

    return asyncio.run(_with_conn(run))


def cmd_unwatch(args: argparse.Namespace) -> int:
    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        w = await capture.unwatch(conn, args.table, force=args.force)
        console.print(f"stopped watching {w.table_schema}.{w.table_name} ({w.entity_type})")
        return 0

    return asyncio.run(_with_conn(run))


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

    return asyncio.run(_with_conn(run))


# ───────────────────────────── workflows ─────────────────────────────


def load_definitions(path: Path) -> list[Any]:
    """A JSON or YAML file holding one workflow or a list of them."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except yaml.YAMLError as exc:
        raise CliError(f"{path}: not valid YAML ({exc})") from None
    except RecursionError:
        raise CliError(f"{path}: not valid JSON or YAML (nested too deeply)") from None
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list):
        return data
    raise CliError(f"{path}: expected a workflow object or a list of workflows")


def cmd_workflow_apply(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from engine.matcher import refresh_broken

    definitions = [
        (Path(f), i, d) for f in args.files for i, d in enumerate(load_definitions(Path(f)))
    ]

    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        results: list[tuple[str, workflows.SaveResult]] = []
        problems: list[str] = []
        # All or nothing: one transaction for every file.
        async with conn.transaction():
            # A bar for long applies, on a terminal only: piped stderr stays plain text.
            quiet = len(definitions) < 5 or not err.is_terminal
            with Progress(console=err, transient=True, disable=quiet) as progress:
                task = progress.add_task("applying workflows", total=len(definitions))
                for path, index, definition in definitions:
                    where = f"{path}" + (f"[{index}]" if len(definitions) > 1 else "")
                    try:
                        async with conn.transaction():
                            results.append((where, await workflows.apply(conn, definition)))
                    except DefinitionError as exc:
                        problems += [f"{where}: {issue}" for issue in exc.issues]
                    except workflows.NameTaken as exc:
                        problems.append(f"{where}: {exc}")
                    progress.advance(task)
            if problems:
                for p in problems:
                    err.print(f"[red]error[/] {p}", highlight=False)
                err.print("nothing was applied")
                raise _Rollback
        for where, r in results:
            what = "created" if r.created else ("new version" if r.new_version else "unchanged")
            console.print(
                f"{where}: workflow {r.id} [bold]{r.name}[/] v{r.version} ({r.status}) {what}",
                highlight=False,
                soft_wrap=True,  # one line per workflow, however long its path
            )
        _warn_broken(await refresh_broken(conn))
        return 0

    try:
        return asyncio.run(_with_conn(run))
    except _Rollback:
        return 1


class _Rollback(Exception):
    pass


def _warn_broken(broken: list[dict[str, Any]]) -> None:
    for b in broken:
        err.print(
            f"[yellow]warning[/] workflow {b['id']} {escape(b['name'])} is broken (matches "
            f"nothing): {escape(b['reason'])}; once fixed: crmflow workflow replay-events "
            f"{b['id']}",
            highlight=False,
            soft_wrap=True,
        )


def cmd_workflow_replay_events(args: argparse.Namespace) -> int:
    from engine.matcher import replay_events

    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        wf = await workflows.find_workflow(conn, args.id)
        report = await replay_events(conn, wf["id"])
        if args.json:
            dump_json(report)
            return 0
        since = report["since_event_id"]
        console.print(
            f"workflow {wf['id']} {wf['name']}: "
            + (
                f"replayed {report['events']} event(s) since event {since}, "
                f"{report['enrolled']} enrolled"
                if since is not None
                else "no missed events to replay"
            ),
            highlight=False,
        )
        return 0

    return asyncio.run(_with_conn(run))


def cmd_workflow_list(args: argparse.Namespace) -> int:
    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        rows = await workflows.list_workflows(conn, include_archived=args.all)
        if args.json:
            dump_json(rows)
            return 0
        table = Table("id", "name", "status", "trigger", "entity", "version", "executions")
        for r in rows:
            table.add_row(
                str(r["id"]),
                r["name"],
                r["status"] + (" [red](broken)[/]" if r["broken"] else ""),
                r["trigger_type"],
                r["entity_type"] or "-",
                str(r["version"]),
                str(r["execution_count"]),
            )
        console.print(table)
        for r in rows:
            if r["broken"]:
                err.print(
                    f"workflow {r['id']} is broken: {r['broken_reason']}",
                    highlight=False,
                    markup=False,
                )
        return 0

    return asyncio.run(_with_conn(run))


def cmd_workflow_show(args: argparse.Namespace) -> int:
    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        wf = await workflows.find_workflow(conn, args.id)
        if args.json:
            dump_json(wf)
            return 0
        console.print(
            f"[bold]{wf['name']}[/] (id {wf['id']}, v{wf['version']}, {wf['status']}, "
            f"{wf['execution_count']} executions)",
            highlight=False,
        )
        if wf["broken"]:
            console.print(
                f"[red]broken[/] since {wf['broken_at']:%Y-%m-%d %H:%M:%S}: "
                f"{escape(wf['broken_reason'])}",
                highlight=False,
            )
        if wf["broken_since_event_id"] is not None:
            console.print(
                f"missed events from event {wf['broken_since_event_id']} on: "
                f"crmflow workflow replay-events {wf['id']}",
                highlight=False,
            )
        console.print_json(json.dumps(wf["definition"]))
        console.print("[dim]compiled predicate:[/]")
        console.print(wf["predicate"], highlight=False, markup=False)
        return 0

    return asyncio.run(_with_conn(run))


def _status_command(status: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        async def run(conn: psycopg.AsyncConnection[Any]) -> int:
            wf = await workflows.find_workflow(conn, args.id)
            row = await workflows.set_status(conn, wf["id"], status)
            console.print(f"workflow {row['id']} {row['name']}: {row['status']}", highlight=False)
            return 0

        return asyncio.run(_with_conn(run))

    return command


def cmd_workflow_versions(args: argparse.Namespace) -> int:
    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        wf = await workflows.find_workflow(conn, args.id)
        rows = await workflows.list_versions(conn, wf["id"])
        if args.json:
            dump_json(rows)
            return 0
        table = Table("version", "created", "trigger", "current")
        for r in rows:
            table.add_row(
                str(r["version"]),
                r["created_at"].isoformat(timespec="seconds"),
                r["trigger_type"],
                "yes" if r["current"] else "",
            )
        console.print(table)
        return 0

    return asyncio.run(_with_conn(run))


def cmd_workflow_run(args: argparse.Namespace) -> int:
    from engine.scheduler import NotRunnable, run_now

    try:
        payload = json.loads(args.input) if args.input else None
    except json.JSONDecodeError as exc:
        raise CliError(f"--input is not valid JSON ({exc})") from None
    entity_id: Any = args.entity_id
    if entity_id and entity_id.lstrip().startswith("{"):  # a composite key as a JSON object
        try:
            entity_id = json.loads(entity_id)
        except json.JSONDecodeError as exc:
            raise CliError(f"--entity-id is not a valid JSON object ({exc})") from None

    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        wf = await workflows.find_workflow(conn, args.id)
        try:
            ids = await run_now(conn, wf["id"], input=payload, entity_id=entity_id)
        except NotRunnable as exc:
            raise CliError(f"workflow {wf['id']} {wf['name']}: {exc}") from None
        if args.json:
            dump_json({"workflow_id": wf["id"], "execution_ids": ids})
        else:
            console.print(
                f"workflow {wf['id']} {wf['name']}: {len(ids)} execution(s) enrolled {ids[:20]}",
                highlight=False,
            )
        return 0

    return asyncio.run(_with_conn(run))


# ───────────────────────────── executions ─────────────────────────────


def cmd_executions_list(args: argparse.Namespace) -> int:
    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        workflow_id = None
        if args.workflow:
            workflow_id = (await workflows.find_workflow(conn, args.workflow))["id"]
        rows = await executions.list_executions(
            conn,
            workflow_id=workflow_id,
            status=args.status,
            entity_type=args.entity_type,
            limit=args.limit,
        )
        if args.json:
            dump_json(rows)
            return 0
        table = Table("id", "workflow", "entity", "status", "triggered", "actions", "error")
        for r in rows:
            table.add_row(
                str(r["id"]),
                r["workflow_name"],
                f"{r['entity_type'] or '-'} {r['entity_id'] if r['entity_id'] is not None else ''}",
                r["status"],
                r["triggered_at"].isoformat(timespec="seconds"),
                str(r["actions_count"]),
                (r["error"] or "")[:60],
            )
        console.print(table)
        return 0

    return asyncio.run(_with_conn(run))


def cmd_executions_show(args: argparse.Namespace) -> int:
    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        detail = await executions.get_execution(conn, args.id)
        if args.json:
            dump_json(detail)
            return 0
        console.print(
            f"execution {detail['id']} of [bold]{detail['workflow_name']}[/] "
            f"v{detail['workflow_version']}: {detail['status']}",
            highlight=False,
        )
        if detail["error"]:
            console.print(f"[red]{detail['error']}[/]", highlight=False)
        console.print(f"trace {detail['trace_id']}", highlight=False)
        table = Table("step", "type", "status", "attempts", "started", "finished", "error")
        for s in detail["steps"]:
            table.add_row(
                s["id"],
                s["type"],
                s["status"],
                str(s["attempts"]),
                s["started_at"].isoformat(timespec="seconds") if s["started_at"] else "",
                s["finished_at"].isoformat(timespec="seconds") if s["finished_at"] else "",
                (s["error"] or "")[:60],
            )
        console.print(table)
        return 0

    return asyncio.run(_with_conn(run))


def _runner_command(verb: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        from engine.executor.runner import Runner

        async def run() -> int:
            pool = db.create_pool(database_url(), min_size=1, max_size=2)
            await pool.open()
            try:
                runner = Runner(pool)
                ok = await (runner.replay(args.id) if verb == "retry" else runner.cancel(args.id))
            finally:
                await pool.close()
            if not ok:
                state = "failed" if verb == "retry" else "pending, waiting or running"
                raise CliError(f"execution {args.id} is not {state}")
            console.print(
                f"execution {args.id}: "
                + ("replaying from the failed step" if verb == "retry" else "cancelled")
            )
            return 0

        return asyncio.run(run())

    return command


def cmd_seed(args: argparse.Namespace) -> int:
    from engine.seed import seed

    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        seeded = await seed(conn)
        for r in seeded.workflows:
            console.print(
                f"workflow {r.id} [bold]{r.name}[/] v{r.version} ({r.status})", highlight=False
            )
        if seeded.users:
            console.print(
                f"added {len(seeded.users)} example users (for the workflows to assign"
                " and notify):",
                highlight=False,
            )
            for u in seeded.users:
                console.print(
                    f"  user {u['id']} {u['name']} ({u['role']})", highlight=False, markup=False
                )
        else:
            console.print("users: the users table has users; no example users added")
        for role in seeded.missing_roles:
            console.print(
                f"warning: no active user has the role {role!r}: the pre-configured"
                f" workflows that assign or notify a {role} will skip or fail; add one with"
                f" INSERT INTO users (name, email, role) VALUES ('...', '...', '{role}')",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
        return 0

    return asyncio.run(_with_conn(run))


def cmd_demo(args: argparse.Namespace) -> int:
    from engine.demo import run_demo

    return asyncio.run(run_demo(wait_delayed=args.wait))


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.cli import main as bench_main

    return bench_main(quick=args.quick, as_json=args.json, only=args.only, peers=args.peers)


# ───────────────────────────── API keys, API ─────────────────────────────


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

    return asyncio.run(_with_conn(run))


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

    return asyncio.run(_with_conn(run))


def cmd_apikey_revoke(args: argparse.Namespace) -> int:
    from engine import apikeys

    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        try:
            row = await apikeys.revoke(conn, args.id)
        except apikeys.ApiKeyNotFound:
            raise CliError(f"no API key {args.id}") from None
        console.print(f"API key {row['id']} {row['name']}: revoked", highlight=False)
        return 0

    return asyncio.run(_with_conn(run))


def cmd_api(args: argparse.Namespace) -> int:
    from api.main import create_app, serve

    serve(
        create_app(),
        host=args.host,
        port=args.port,
        log_level="debug" if args.verbose else "info",
        proxy_headers=True,
    ).run()
    return 0


# ───────────────────────────── prune ─────────────────────────────


def _duration_arg(text: str) -> float:
    from engine.model import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _human_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def cmd_prune(args: argparse.Namespace) -> int:
    from rich.progress import Progress, TaskID

    from engine import retention

    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        if args.dry_run:
            counts = await retention.count_prunable(
                conn, outbox_older_than=args.older_than, history_older_than=args.older_than
            )
            verb = "would delete"
        else:
            # A live display only for a person watching (stderr a terminal), not in logs.
            with Progress(console=err, transient=True, disable=not err.is_terminal) as bar:
                tasks: dict[str, TaskID] = {}

                def progress(what: str, rows: int) -> None:
                    if what not in tasks:
                        tasks[what] = bar.add_task(f"deleting {what}", total=None)
                    bar.update(tasks[what], completed=rows, description=f"deleting {what}: {rows}")

                counts = await retention.prune(
                    conn,
                    outbox_older_than=args.older_than,
                    history_older_than=args.older_than,
                    batch_size=args.batch_size,
                    progress=progress,
                )
            verb = "deleted"
        if args.json:
            dump_json(
                {
                    "dry_run": args.dry_run,
                    "cutoff": counts.cutoffs.get("outbox"),
                    "outbox_events": counts.outbox,
                    "executions": counts.executions,
                    "steps": counts.steps,
                    "jobs": counts.jobs,
                }
            )
        else:
            console.print(
                f"{verb} {counts.outbox} outbox events, {counts.executions} executions "
                f"({counts.steps} steps) and {counts.jobs} finished jobs older than "
                f"{_human_duration(args.older_than)}",
                highlight=False,
            )
        return 0

    if args.batch_size < 1:
        raise CliError("--batch-size is at least 1")
    return asyncio.run(_with_conn(run))


# ───────────────────────────── worker ─────────────────────────────


def cmd_worker(args: argparse.Namespace) -> int:
    from engine.worker import Worker

    url = database_url()
    if args.metrics_port:
        from engine.metrics import serve

        serve(url, args.metrics_port)

    async def run() -> int:
        worker = Worker(url, concurrency=args.concurrency)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker.stop_event.set)
        await worker.start()
        console.print(
            f"crmflow worker {worker.worker_id} running (concurrency "
            f"{args.concurrency}); Ctrl+C stops it"
        )
        await worker.wait()
        await worker.stop()
        return 0

    return asyncio.run(run())


# ───────────────────────────── parser ─────────────────────────────


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crmflow", description="A database-native workflow rules engine for CRM data."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    p.set_defaults(func=cmd_watch, all_rows=None)

    p = sub.add_parser("unwatch", help="stop capturing a table")
    p.add_argument("table")
    p.add_argument("--force", action="store_true", help="pause active workflows that use it")
    p.set_defaults(func=cmd_unwatch)

    p = sub.add_parser("entities", help="list watched tables")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_entities)

    wf = sub.add_parser("workflow", help="manage workflows").add_subparsers(
        dest="workflow_command", required=True, metavar="SUBCOMMAND"
    )
    p = wf.add_parser("apply", help="create or update workflows from JSON/YAML files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_workflow_apply)
    p = wf.add_parser("list", help="list workflows")
    p.add_argument("--all", action="store_true", help="include archived workflows")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_workflow_list)
    p = wf.add_parser("show", help="show a workflow and its compiled predicate")
    p.add_argument("id", help="workflow id or name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_workflow_show)
    for verb, status in (("activate", "active"), ("pause", "paused"), ("archive", "archived")):
        p = wf.add_parser(verb, help=f"set a workflow {status}")
        p.add_argument("id", help="workflow id or name")
        p.set_defaults(func=_status_command(status))
    p = wf.add_parser("versions", help="list a workflow's versions")
    p.add_argument("id", help="workflow id or name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_workflow_versions)
    p = wf.add_parser("replay-events", help="match a fixed broken workflow on the events it missed")
    p.add_argument("id", help="workflow id or name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_workflow_replay_events)
    p = wf.add_parser("run", help="run a manual or scheduled workflow now")
    p.add_argument("id", help="workflow id or name")
    p.add_argument("--entity-id", help="run for this entity only")
    p.add_argument("--input", help="JSON object available to templates as input")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_workflow_run)

    ex = sub.add_parser("executions", help="execution history").add_subparsers(
        dest="executions_command", required=True, metavar="SUBCOMMAND"
    )
    p = ex.add_parser("list", help="list executions, newest first")
    p.add_argument("--workflow", help="workflow id or name")
    p.add_argument("--status", choices=executions.EXECUTION_STATUSES)
    p.add_argument("--entity-type")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_executions_list)
    p = ex.add_parser("show", help="one execution with its steps")
    p.add_argument("id", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_executions_show)
    p = ex.add_parser("retry", help="replay a failed execution from its failed step")
    p.add_argument("id", type=int)
    p.set_defaults(func=_runner_command("retry"))
    p = ex.add_parser("cancel", help="cancel a pending, waiting or running execution")
    p.add_argument("id", type=int)
    p.set_defaults(func=_runner_command("cancel"))

    p = sub.add_parser("seed", help="create the example CRM and install the seed workflows")
    p.set_defaults(func=cmd_seed)

    p = sub.add_parser("demo", help="everything in one command, on an embedded PostgreSQL")
    p.add_argument(
        "--wait",
        action="store_true",
        help="also wait for the delayed steps (enrich_lead runs 60 s later)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="the benchmark suite (docs/design.md, Targets)")
    p.add_argument("--quick", action="store_true", help="smaller sizes, under a minute")
    p.add_argument("--json", action="store_true")
    p.add_argument("--only", help="comma-separated ids, e.g. P3,Q1")
    p.add_argument(
        "--peers",
        action="store_true",
        help="also run the same jobs on procrastinate, pgqueuer and graphile-worker "
        "(those that can be installed) and print crmflow ÷ peer",
    )
    p.set_defaults(func=cmd_bench)

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

    p = sub.add_parser("api", help="serve the management API (FastAPI, uvicorn)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.set_defaults(func=cmd_api)

    p = sub.add_parser(
        "prune",
        help="delete processed events, finished executions and jobs older than a duration",
    )
    p.add_argument(
        "--older-than",
        required=True,
        type=_duration_arg,
        metavar="DURATION",
        help="age of what is deleted: 30d, 12h, 90m, or seconds",
    )
    p.add_argument("--dry-run", action="store_true", help="count what would be deleted")
    p.add_argument("--batch-size", type=int, default=1000, help="rows per transaction")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("worker", help="run matcher, scheduler and job worker in one process")
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on this port (this process's and the database's)",
    )
    p.set_defaults(func=cmd_worker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (
        CliError,
        capture.CaptureError,
        db.Busy,
        workflows.WorkflowNotFound,
        workflows.ReplayRefused,
        executions.ExecutionNotFound,
    ) as exc:
        message = str(exc)
        if isinstance(exc, workflows.WorkflowNotFound):
            message = f"no workflow {exc.args[0]!r}"
        if isinstance(exc, executions.ExecutionNotFound):
            message = f"no execution {exc.args[0]!r}"
        err.print(f"[red]error[/] {message}", highlight=False)
        return 1
    except DefinitionError as exc:
        for issue in exc.issues:
            err.print(f"[red]error[/] {issue}", highlight=False)
        return 1
    except psycopg.errors.LockNotAvailable as exc:
        err.print(
            f"[red]error[/] a lock stayed taken by another session ({exc}); waits are bounded"
            " by CRMFLOW_LOCK_TIMEOUT: try again",
            highlight=False,
        )
        return 1
    except psycopg.OperationalError as exc:
        err.print(f"[red]error[/] cannot reach the database: {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
