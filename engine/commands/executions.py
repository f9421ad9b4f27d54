"""`crmflow executions ...`: the history of executions, retry and cancel."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import Any

import psycopg
from rich.table import Table

from engine import db, executions, workflows
from engine.commands.common import (
    CliError,
    console,
    database_url,
    dump_json,
    with_conn,
)


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

    return asyncio.run(with_conn(run))


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

    return asyncio.run(with_conn(run))


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


def register(sub: Any) -> None:
    """Add these commands to the top-level subparsers."""
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
