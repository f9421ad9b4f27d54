"""``crmflow demo``: everything in one command, on an embedded PostgreSQL by default.

Creates a database, migrates, installs the example CRM with the seed workflows,
starts a worker and a small local enrichment endpoint, makes the writes a sales team
would make, then plays the churn-risk scenario (docs/churn.md): two years of customer
history generated, the churn scorecard fitted on it (its quality printed), the daily
batch scoring every account, the churn playbook firing for the top risks. It prints
what fired and how long it took.

The parts: ``engine.demo_crm`` (the sales team's writes, the enrichment endpoint, the
console), ``engine.demo_churn`` (the churn scenario); this module starts the database
and the worker, runs them, and prints the report.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
from psycopg import sql
from rich.table import Table

from engine import db
from engine.config import Settings, get_settings
from engine.demo_churn import CHURN_ACCOUNTS, CHURN_CARD, churn_scenario
from engine.demo_crm import LEADS, USERS, console, enrichment_endpoint, settled, writes
from engine.embedded import ensure_database, start_embedded
from engine.migrations import migrate
from engine.scheduler import run_now
from engine.seed import seed
from engine.worker import Worker

__all__ = [
    "CHURN_ACCOUNTS",
    "CHURN_CARD",
    "DEMO_DB",
    "LEADS",
    "USERS",
    "churn_scenario",
    "console",
    "enrichment_endpoint",
    "run_demo",
]

DEMO_DB = "crmflow_demo"


def _database(settings: Settings) -> tuple[str, str]:
    """A URL and how to describe it. The embedded server gets a fresh demo database."""
    if settings.database_url:
        return settings.database_url, "the database in CRMFLOW_DATABASE_URL"
    server = start_embedded(settings.embedded_data_dir)
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DEMO_DB))
        )
    url = ensure_database(server, DEMO_DB)
    return url, f"an embedded PostgreSQL (pgserver) in {settings.embedded_data_dir}/"


REPORT = """
SELECT w.name,
       count(x.id) AS executions,
       count(*) FILTER (WHERE x.status = 'completed') AS completed,
       count(*) FILTER (WHERE x.status = 'waiting') AS waiting,
       count(*) FILTER (WHERE x.status = 'failed') AS failed,
       percentile_cont(0.5) WITHIN GROUP (
           ORDER BY extract(epoch FROM f.first_done - x.triggered_at)) AS p50_first_action,
       max(extract(epoch FROM f.first_done - x.triggered_at)) AS max_first_action
  FROM crmflow.workflows AS w
  LEFT JOIN crmflow.executions AS x ON x.workflow_id = w.id
  LEFT JOIN LATERAL (SELECT min(s.finished_at) AS first_done FROM crmflow.execution_steps AS s
                      WHERE s.execution_id = x.id AND s.status = 'succeeded') AS f ON true
 GROUP BY w.id, w.name ORDER BY w.id
"""


def _ms(seconds: Any) -> str:
    return "-" if seconds is None else f"{float(seconds) * 1000:.0f} ms"


async def _report(conn: psycopg.AsyncConnection[Any], elapsed: float, url: str) -> None:
    console.print(await _fired(conn))
    console.print(await _leads(conn))
    await _effects(conn)
    waiting = await (
        await conn.execute(
            "SELECT count(*) AS n, min(scheduled_at) AS at FROM crmflow.execution_steps "
            "WHERE status = 'scheduled'"
        )
    ).fetchone()
    if waiting and waiting["n"]:
        console.print(
            f"[dim]{waiting['n']} delayed step(s) waiting (enrich_lead runs 60 s after "
            f"qualification, first at {waiting['at']:%H:%M:%S}); "
            "`crmflow demo --wait` waits for them.[/]"
        )
    console.print(
        f"[bold green]Done in {elapsed:.1f} s.[/] The example workflows are in "
        "examples/workflows/. The history stays in the demo database:"
    )
    console.print(
        f"  CRMFLOW_DATABASE_URL='{url}' crmflow executions list",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


async def _fired(conn: psycopg.AsyncConnection[Any]) -> Table:
    """Per workflow: its executions by status, and how soon the first action followed."""
    table = Table(title="What fired", title_justify="left")
    for column in (
        "workflow",
        "executions",
        "completed",
        "waiting",
        "failed",
        "event → first action (p50)",
        "max",
    ):
        table.add_column(column, justify="left" if column == "workflow" else "right")
    for r in await (await conn.execute(REPORT)).fetchall():
        table.add_row(
            r["name"],
            str(r["executions"]),
            str(r["completed"]),
            str(r["waiting"]),
            str(r["failed"]),
            _ms(r["p50_first_action"]),
            _ms(r["max_first_action"]),
        )
    return table


async def _leads(conn: psycopg.AsyncConnection[Any]) -> Table:
    """The leads as qualify_lead scored them and enrich_lead filled them in."""
    leads = Table(title="Leads qualified (qualify_lead)", title_justify="left")
    for column in ("lead", "source", "score", "status", "industry (enrich_lead)"):
        leads.add_column(column)
    for r in await (
        await conn.execute("SELECT name, source, score, status, industry FROM leads ORDER BY id")
    ).fetchall():
        leads.add_row(
            r["name"],
            r["source"] or "",
            "" if r["score"] is None else str(r["score"]),
            r["status"],
            r["industry"] or "",
        )
    return leads


async def _effects(conn: psycopg.AsyncConnection[Any]) -> None:
    """The first tasks and notifications the workflows made (and how many in all)."""
    effects = Table(title="Tasks and notifications", title_justify="left")
    effects.add_column("kind")
    effects.add_column("for")
    effects.add_column("text")
    shown = 12  # of each kind (the churn playbook makes many)
    for r in await (
        await conn.execute(
            "(SELECT 'task' AS kind, u.name AS who, t.title || ' [' || t.priority || ']' AS text "
            "FROM tasks t LEFT JOIN users u ON u.id = t.assignee_id ORDER BY t.id LIMIT %(n)s) "
            "UNION ALL (SELECT 'notification', u.name, n.message FROM notifications n "
            "LEFT JOIN users u ON u.id = n.recipient_id ORDER BY n.id LIMIT %(n)s)",
            {"n": shown},
        )
    ).fetchall():
        effects.add_row(r["kind"], r["who"] or "-", r["text"])
    console.print(effects)
    more = await (
        await conn.execute(
            "SELECT (SELECT count(*) FROM tasks) AS tasks,"
            " (SELECT count(*) FROM notifications) AS notifications"
        )
    ).fetchone()
    if more and (more["tasks"] > shown or more["notifications"] > shown):
        console.print(
            f"[dim]{more['tasks']} tasks and {more['notifications']} notifications in all"
            " (the first of each above).[/]"
        )


async def run_demo(
    wait_delayed: bool = False, churn: bool = True, churn_accounts: int = CHURN_ACCOUNTS
) -> int:
    started = time.monotonic()
    base = get_settings()
    with console.status("starting PostgreSQL"):
        url, where = _database(base)
    console.print(f"[bold]crmflow demo[/] on {where}")
    async with await db.connect(url, autocommit=True) as conn:
        report = await migrate(conn)
        console.print(f"migrated: {', '.join(report.applied) or 'up to date'}")
        for r in (await seed(conn, base)).workflows:
            console.print(f"  workflow {r.id}: [bold]{r.name}[/] ({r.status})", highlight=False)
        await conn.execute("TRUNCATE users RESTART IDENTITY CASCADE")
        for name, email, role in USERS:
            await conn.execute(
                "INSERT INTO users (name, email, role) VALUES (%s, %s, %s)", [name, email, role]
            )

    async with enrichment_endpoint() as enrichment_url:
        settings = base.model_copy(
            update={
                "database_url": url,
                "enrichment_url": enrichment_url,
                "matcher_poll_interval": 0.2,
            }
        )
        worker = Worker(url, concurrency=8, settings=settings)
        await worker.start()
        try:
            async with await db.connect(url, autocommit=True) as conn:
                with console.status("a sales team at work: leads, deals, accounts"):
                    counts = await writes(conn)
                    stale = await (
                        await conn.execute(
                            "SELECT id FROM crmflow.workflows"
                            " WHERE name = 'Follow up on stale deals'"
                        )
                    ).fetchone()
                    if stale:  # the daily 9:00 run, now
                        await run_now(conn, stale["id"], settings=settings)
                console.print(
                    f"wrote {counts['leads']} leads, {counts['accounts']} accounts and "
                    f"{counts['deals']} deals; ran the daily stale-deal check now"
                )
                message = (
                    "waiting for the delayed steps (about a minute)"
                    if wait_delayed
                    else "waiting for the workflows"
                )
                with console.status(message):
                    deadline = time.monotonic() + (150 if wait_delayed else 60)
                    while not await settled(conn, wait_delayed) and time.monotonic() < deadline:
                        await asyncio.sleep(0.2)
                if churn:
                    console.print("[bold]The churn-risk scenario[/]")
                    await churn_scenario(conn, churn_accounts)
                await _report(conn, time.monotonic() - started, url)
        finally:
            await worker.stop()
    return 0
