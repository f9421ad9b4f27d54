"""`crmflow workflow history/export/backfill`: the audit trail, files that `workflow
apply` takes back, and enrolling the rows that already match an event workflow."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import yaml
from rich.markup import escape
from rich.table import Table

from engine import audit, backfill, workflows
from engine.commands.common import CliError, console, dump_json, err, with_conn

VALUE_WIDTH = 60
# The `workflow` subcommands that change workflows (engine/commands/workflow.py).
CHANGING = ("apply", "activate", "pause", "archive")


def _value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= VALUE_WIDTH else text[: VALUE_WIDTH - 1] + "…"


def describe(change: dict[str, Any]) -> str:
    """One line per changed path: ``path: before → after``, ``+``/``-`` when added/removed."""
    lines = []
    for entry in change["diff"]:
        path = entry["path"]
        if "before" in entry and "after" in entry:
            lines.append(f"{path}: {_value(entry['before'])} → {_value(entry['after'])}")
        elif "after" in entry:
            if change["action"] == "create":
                lines.append(f"{path}: {_value(entry['after'])}")
            else:
                lines.append(f"{path}: + {_value(entry['after'])}")
        else:
            lines.append(f"{path}: - {_value(entry['before'])}")
    return "\n".join(lines)


def cmd_workflow_history(args: argparse.Namespace) -> int:
    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        wf = await workflows.find_workflow(conn, args.id)
        rows = await audit.history(conn, wf["id"])
        if args.json:
            dump_json(rows)
            return 0
        table = Table("at", "version", "action", "who", "changes", title=f"{wf['name']}")
        for r in rows:
            table.add_row(
                r["at"].isoformat(timespec="seconds"),
                str(r["version"]),
                r["action"],
                escape(r["actor"]),
                escape(describe(r)),
            )
        console.print(table)
        return 0

    return asyncio.run(with_conn(run))


# ───────────────────────────── export ─────────────────────────────


def exported(wf: dict[str, Any]) -> dict[str, Any]:
    """The definition as `workflow apply` takes it: the stored definition, its name
    first, and the workflow's status."""
    definition = wf["definition"]
    return {
        "name": wf["name"],
        **{k: v for k, v in definition.items() if k not in ("name", "status")},
        "status": wf["status"],
    }


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:60].rstrip("-") or "workflow"


def _dump(definition: Any, fmt: str) -> str:
    if fmt == "yaml":
        text: str = yaml.safe_dump(
            definition, sort_keys=False, allow_unicode=True, default_flow_style=False
        )
        return text
    return json.dumps(definition, indent=2, ensure_ascii=False) + "\n"


def cmd_workflow_export(args: argparse.Namespace) -> int:
    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        if args.ids:
            chosen = [await workflows.find_workflow(conn, ref) for ref in args.ids]
            archived = [w for w in chosen if w["status"] == "archived"]
            if archived:
                raise CliError(
                    f"workflow {archived[0]['id']} is archived: archived workflows are history "
                    "and are not exported"
                )
        else:
            chosen = [
                await workflows.get_workflow(conn, w["id"])
                for w in await workflows.list_workflows(conn)
            ]
        definitions = [(w, exported(w)) for w in chosen]
        if args.out is None:
            text = _dump([d for _, d in definitions], args.format)
            print(text, end="")
            return 0
        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CliError(f"{out}: {exc.strerror}") from None
        suffix = "yaml" if args.format == "yaml" else "json"
        for wf, definition in definitions:
            path = out / f"{wf['id']:04d}-{_slug(wf['name'])}.{suffix}"
            try:
                path.write_text(_dump(definition, args.format), encoding="utf-8")
            except OSError as exc:
                raise CliError(f"{path}: {exc.strerror}") from None
            console.print(
                f"workflow {wf['id']} {escape(wf['name'])} ({wf['status']}): {path}",
                highlight=False,
                soft_wrap=True,
            )
        return 0

    return asyncio.run(with_conn(run))


# ───────────────────────────── backfill ─────────────────────────────


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return int(text)


def cmd_workflow_backfill(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        wf = await workflows.find_workflow(conn, args.id)
        try:
            plan = await backfill.plan(conn, wf["id"])
        except backfill.BackfillRefused as exc:
            raise CliError(str(exc)) from None
        total = await backfill.estimate(conn, plan)
        verb = "counting" if args.dry_run else "enrolling"
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rows · {task.fields[enrolled]} enrolled"),
            console=err,
            transient=True,
            disable=args.json or not err.is_terminal,
        ) as progress:
            task = progress.add_task(f"{verb} {wf['name']}", total=total or None, enrolled=0)
            enrolled = 0

            def advance(batch: backfill.Batch) -> None:
                nonlocal enrolled
                enrolled += batch.enrolled
                progress.update(task, advance=batch.scanned, enrolled=enrolled)

            report = await backfill.run(
                conn,
                wf["id"],
                dry_run=args.dry_run,
                limit=args.limit,
                batch_size=args.batch_size,
                prepared=plan,
                progress=advance,
            )
        if args.json:
            dump_json(report.as_dict())
            return 0
        if args.dry_run:
            console.print(
                f"workflow {wf['id']} {escape(wf['name'])}: dry run, {report.enrolled} row(s) "
                f"would enroll ({report.matched} of {report.scanned} match, "
                f"{report.skipped} left out); nothing was changed",
                highlight=False,
            )
        else:
            console.print(
                f"workflow {wf['id']} {escape(wf['name'])}: {report.enrolled} enrolled "
                f"({report.matched} of {report.scanned} rows match, {report.skipped} left "
                f"out: enrolled before, re-enrollment policy or --limit) in "
                f"{report.batches} batch(es)",
                highlight=False,
            )
        return 0

    return asyncio.run(with_conn(run))


def _acting_as(command: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """``command`` with the audit trail naming ``--actor`` (else the OS user)."""

    def run(args: argparse.Namespace) -> int:
        with audit.acting_as(args.actor):
            return command(args)

    return run


def register(wf: Any) -> None:
    """Add history, export and backfill to the `workflow` subcommands' subparsers, and
    ``--actor`` to the subcommands that change workflows (who their history names)."""
    for name in CHANGING:
        changing = wf.choices.get(name)
        if changing is None:
            continue
        changing.add_argument(
            "--actor",
            metavar="NAME",
            help="who the workflow's history names for this change (default: the OS user)",
        )
        changing.set_defaults(func=_acting_as(changing.get_default("func")))
    p = wf.add_parser("history", help="a workflow's changes: who, when, what (the audit trail)")
    p.add_argument("id", help="workflow id or name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_workflow_history)
    p = wf.add_parser(
        "export",
        help="write workflows as files that `workflow apply` takes back (status included)",
    )
    p.add_argument("ids", nargs="*", metavar="ID", help="workflow ids or names (default: all)")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="write one file per workflow into DIR (default: one list on stdout)",
    )
    p.add_argument("--format", choices=("json", "yaml"), default="json")
    p.set_defaults(func=cmd_workflow_export)
    p = wf.add_parser("backfill", help="enroll the existing rows that match an event workflow, now")
    p.add_argument("id", help="workflow id or name")
    p.add_argument("--dry-run", action="store_true", help="count what would enroll; change nothing")
    p.add_argument(
        "--limit", type=positive_int, metavar="N", help="enroll at most N rows in this run"
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=backfill.BATCH_SIZE,
        metavar="N",
        help=f"rows per batch, a transaction each (default {backfill.BATCH_SIZE})",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_workflow_backfill)
