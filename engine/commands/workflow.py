"""`crmflow workflow ...`: apply, list, show, status changes, versions, replay, run."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import yaml
from rich.markup import escape
from rich.table import Table

from engine import workflows
from engine.commands.common import (
    CliError,
    console,
    dump_json,
    err,
    with_conn,
)
from engine.model import DefinitionError


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
        return asyncio.run(with_conn(run))
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

    return asyncio.run(with_conn(run))


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

    return asyncio.run(with_conn(run))


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

    return asyncio.run(with_conn(run))


def _status_command(status: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        async def run(conn: psycopg.AsyncConnection[Any]) -> int:
            wf = await workflows.find_workflow(conn, args.id)
            row = await workflows.set_status(conn, wf["id"], status)
            console.print(f"workflow {row['id']} {row['name']}: {row['status']}", highlight=False)
            return 0

        return asyncio.run(with_conn(run))

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

    return asyncio.run(with_conn(run))


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

    return asyncio.run(with_conn(run))


def register(sub: Any) -> Any:
    """Add `workflow` and its subcommands; returns the subcommands' subparsers, so other
    modules can add theirs (engine/cli.py)."""
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
    return wf
