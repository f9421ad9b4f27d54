"""``crmflow demo``: everything in one command, on an embedded PostgreSQL by default.

Creates a database, migrates, installs the example CRM with the seed workflows,
starts a worker and a small local enrichment endpoint, makes the writes a sales team
would make, and prints what fired and how long it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

from engine import db
from engine.config import Settings, get_settings
from engine.embedded import ensure_database, start_embedded
from engine.migrations import migrate
from engine.scheduler import run_now
from engine.seed import EXAMPLE_USERS, seed
from engine.worker import Worker

console = Console()
DEMO_DB = "crmflow_demo"

USERS = EXAMPLE_USERS  # the demo's writes need ids 1 and 2 to be the sales reps
LEADS = [
    ("Grace Hopper", "grace@navy-systems.com", "Navy Systems", "CTO", "website_form"),
    ("Tim Berners", "tim@webfoundation.org", "Web Foundation", "Founder", "referral"),
    ("Ada Lovelace", "ada@analytical.io", "Analytical Engines", "Head of Data", "website_form"),
    ("Joe Bloggs", "joe.bloggs@gmail.com", None, None, "website_form"),
    ("Linus T", "linus@kernel.dev", "Kernel Labs", "Engineer", "event"),
    ("Margaret H", "margaret@apollo.space", "Apollo Space", "VP Engineering", "website_form"),
    ("Alan Turing", "alan@bletchley.uk", "Bletchley", "Director of Research", "partner"),
    ("Katherine J", "kj@orbit.aero", "Orbit Aero", "Analyst", "website_form"),
    ("Ken Thompson", "ken@unixco.com", "UnixCo", "Principal", "cold_call"),
    ("Barbara L", "barbara@clu.dev", "CLU", "Chief Architect", "website_form"),
]


def _enrichment_app() -> Any:
    """What a data provider answers about a domain (the demo's stand-in for Clearbit & co)."""
    from fastapi import FastAPI

    app = FastAPI()
    industries = ["Aerospace", "Software", "Research", "Hardware", "Consulting"]

    @app.post("/enrich")
    async def enrich(body: dict[str, Any]) -> dict[str, Any]:
        domain = str(body.get("domain", ""))
        return {
            "industry": industries[len(domain) % len(industries)],
            "employees": 20 + 37 * len(domain),
            "country": "US",
            "linkedin": f"https://linkedin.example/{domain}",
        }

    return app


@contextlib.asynccontextmanager
async def enrichment_endpoint() -> AsyncIterator[str]:
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(
            _enrichment_app(), host="127.0.0.1", port=0, log_level="warning", lifespan="off"
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/enrich"
    finally:
        server.should_exit = True
        await task


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


async def _writes(conn: psycopg.AsyncConnection[Any]) -> dict[str, int]:
    """What a sales team does in a few minutes, one transaction per action, as apps do."""
    n = {"leads": 0, "deals": 0, "accounts": 0}
    for name, email, company, title, source in LEADS:
        await conn.execute(
            "INSERT INTO leads (name, email, company, title, source, owner_id) "
            "VALUES (%s, %s, %s, %s, %s, 1 + (random() > 0.5)::int)",
            [name, email, company, title, source],
        )
        n["leads"] += 1
    for name, arr, days in (
        ("Globex", 180000, 400),
        ("Initech", 52000, 40),
        ("Umbrella", 95000, 200),
        ("Hooli", 310000, 90),
    ):
        await conn.execute(
            "INSERT INTO accounts (name, owner_id, arr, renewal_date) VALUES "
            "(%s, 1, %s, current_date + %s)",
            [name, arr, days],
        )
        n["accounts"] += 1
    for name, account, amount, idle in (
        ("Globex expansion", 1, 40000, 12),
        ("Initech renewal", 2, 52000, 2),
        ("Umbrella pilot", 3, 15000, 9),
        ("Hooli platform", 4, 120000, 1),
    ):
        await conn.execute(
            "INSERT INTO deals (name, account_id, owner_id, amount, last_activity_at) "
            "VALUES (%s, %s, 2, %s, now() - make_interval(days => %s))",
            [name, account, amount, idle],
        )
        n["deals"] += 1
    await conn.execute(
        "UPDATE deals SET status = 'won', last_activity_at = now() WHERE name = 'Hooli platform'"
    )
    await conn.execute(
        "UPDATE deals SET status = 'won', last_activity_at = now() WHERE name = 'Initech renewal'"
    )
    await conn.execute(
        "UPDATE accounts SET churn_risk = 'high', health_score = 41 WHERE name = 'Umbrella'"
    )
    await conn.execute(
        "UPDATE accounts SET churn_risk = 'critical', health_score = 12 WHERE name = 'Globex'"
    )
    await conn.execute("UPDATE accounts SET churn_risk = 'medium' WHERE name = 'Initech'")
    return n


async def _settled(conn: psycopg.AsyncConnection[Any], wait_delayed: bool) -> bool:
    live = ("pending", "running", "waiting") if wait_delayed else ("pending", "running")
    row = await (
        await conn.execute(
            "SELECT count(*) FILTER (WHERE status = ANY(%s)) AS live, "
            "(SELECT count(*) FROM crmflow.outbox WHERE processed_at IS NULL) AS backlog "
            "FROM crmflow.executions",
            [list(live)],
        )
    ).fetchone()
    return bool(row and row["live"] == 0 and row["backlog"] == 0)


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
    console.print(table)

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
    console.print(leads)

    effects = Table(title="Tasks and notifications", title_justify="left")
    effects.add_column("kind")
    effects.add_column("for")
    effects.add_column("text")
    for r in await (
        await conn.execute(
            "SELECT 'task' AS kind, u.name AS who, t.title || ' [' || t.priority || ']' AS text "
            "FROM tasks t LEFT JOIN users u ON u.id = t.assignee_id "
            "UNION ALL SELECT 'notification', u.name, n.message FROM notifications n "
            "LEFT JOIN users u ON u.id = n.recipient_id"
        )
    ).fetchall():
        effects.add_row(r["kind"], r["who"] or "-", r["text"])
    console.print(effects)

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


async def run_demo(wait_delayed: bool = False) -> int:
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
                    counts = await _writes(conn)
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
                    while not await _settled(conn, wait_delayed) and time.monotonic() < deadline:
                        await asyncio.sleep(0.2)
                await _report(conn, time.monotonic() - started, url)
        finally:
            await worker.stop()
    return 0
