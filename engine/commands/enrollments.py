"""`crmflow workflow enrollments ID [--state S] [--json]`: a workflow's enrollment list
(view crmflow.enrollments, engine/lifecycle.py), newest first, with the count per state."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import psycopg
from rich.markup import escape
from rich.table import Table

from engine import lifecycle, workflows
from engine.commands.common import console, dump_json, with_conn
from engine.commands.workflow_admin import positive_int


def _when(value: Any) -> str:
    return value.isoformat(timespec="seconds") if value is not None else "-"


def cmd_workflow_enrollments(args: argparse.Namespace) -> int:
    state = lifecycle.EnrollmentState(args.state) if args.state else None

    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        wf = await workflows.find_workflow(conn, args.id)
        page = await lifecycle.list_enrollments(conn, wf["id"], state=state, limit=args.limit)
        if args.json:
            dump_json(page)
            return 0
        counts = ", ".join(f"{s.replace('_', ' ')} {n}" for s, n in page["counts"].items())
        table = Table(
            "execution",
            "entity",
            "state",
            "current step",
            "waiting until",
            "enrolled",
            "reason",
            title=f"{escape(wf['name'])}: {counts}",
        )
        for e in page["items"]:
            table.add_row(
                str(e["execution_id"]),
                escape(f"{e['entity_type'] or '-'} {e['entity_id'] if e['entity_id'] else ''}"),
                e["state"],
                escape(e["current_step"] or "-"),
                _when(e["waiting_until"]),
                _when(e["enrolled_at"]),
                escape(e["reason"] or ""),
            )
        console.print(table)
        return 0

    return asyncio.run(with_conn(run))


def register(sub: Any) -> None:
    """Add `enrollments` to the `workflow` command's subcommands."""
    workflow = sub.choices["workflow"]
    [wf] = [a for a in workflow._actions if isinstance(a, argparse._SubParsersAction)]
    p = wf.add_parser("enrollments", help="a workflow's enrollments by state, newest first")
    p.add_argument("id", help="workflow id or name")
    p.add_argument(
        "--state",
        choices=[str(s) for s in lifecycle.EnrollmentState],
        help="only enrollments in this state",
    )
    p.add_argument("--limit", type=positive_int, default=50, metavar="N", help="at most N rows")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_workflow_enrollments)
