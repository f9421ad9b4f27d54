"""``crmflow demo``: everything in one command, on an embedded PostgreSQL by default.

Creates a database, migrates, installs the example CRM with the seed workflows,
starts a worker and a small local enrichment endpoint, makes the writes a sales team
would make, then plays the churn-risk scenario (docs/churn.md): two years of customer
history generated, the churn scorecard fitted on it (its quality printed), the daily
batch scoring every account, the churn playbook firing for the top risks. It prints
what fired and how long it took.
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
    # (Churn risk is the churn scorecard's to set: see churn_scenario.)
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


CHURN_CARD = "account_churn_risk"
CHURN_ACCOUNTS = 3000

TOP_RISKS = """
SELECT a.id, a.name, a.churn_risk::text AS level, a.churn_score, a.churn_days, a.churn_factors,
       a.churn_score - h.previous_score AS change, u.name AS csm
  FROM accounts AS a
  LEFT JOIN users AS u ON u.id = a.csm_id
  LEFT JOIN LATERAL (SELECT previous_score FROM crmflow.score_history AS h
                      WHERE h.entity_type = 'account'
                        AND h.entity_key = jsonb_build_object('id', a.id)
                      ORDER BY h.scored_at DESC, h.id DESC LIMIT 1) AS h ON true
 WHERE a.churned_at IS NULL AND a.churn_score IS NOT NULL
 ORDER BY a.churn_score DESC LIMIT %(n)s
"""


async def _playbook_settled(conn: psycopg.AsyncConnection[Any]) -> bool:
    return await _settled(conn, wait_delayed=False)


async def churn_scenario(
    conn: psycopg.AsyncConnection[Any], accounts: int = CHURN_ACCOUNTS
) -> dict[str, Any]:
    """The churn-risk scenario (docs/churn.md): two years of customer history, the
    scorecard fitted on it (quality printed), the daily batch, the playbook for the top
    risks. Returns what it did, for the report."""
    from engine import churn_history
    from engine.scorecards import run

    out: dict[str, Any] = {}
    with console.status(f"generating two years of history for {accounts:,} accounts"):
        generated = await churn_history.generate(conn, accounts)
    console.print(
        f"churn history: {generated.counts['accounts']:,} accounts,"
        f" {generated.counts['logins']:,} logins, {generated.counts['feature_usage']:,} feature"
        f" uses, {generated.counts['support_tickets']:,} tickets,"
        f" {generated.counts['nps_responses']:,} NPS answers,"
        f" {generated.counts['invoices']:,} invoices in {generated.seconds:.1f} s",
        highlight=False,
    )
    out["generated"] = generated
    try:
        from engine.scorecards import fit as fitting

        fitting._require_extras()
    except Exception as exc:  # the 'fit' extra is not installed
        console.print(f"[yellow]not fitting:[/] {exc}; scoring with the hand-set weights")
        out["fit"] = None
    else:
        from engine.commands.score_fit import print_fit

        with console.status("fitting the churn model (logistic + survival)"):
            result = await fitting.fit(conn, CHURN_CARD, "churned_at", 90)
        print_fit(result)
        saved = await fitting.save(conn, result)
        console.print(f"saved {saved.name} v{saved.version} with the fitted weights")
        out["fit"] = result
    with console.status("the daily batch: scoring every account"):
        batch = await run.score(conn, CHURN_CARD)
    console.print(
        f"daily batch: {batch.scored:,} accounts scored, {batch.updated:,} updated,"
        f" {batch.level_changes:,} level changes in {batch.seconds:.2f} s",
        highlight=False,
    )
    out["batch"] = batch
    with console.status("the churn playbook at work"):
        deadline = time.monotonic() + 90
        while not await _playbook_settled(conn) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
    levels = await (
        await conn.execute(
            "SELECT churn_risk::text AS level, count(*) AS n FROM accounts"
            " WHERE churned_at IS NULL GROUP BY 1 ORDER BY 1"
        )
    ).fetchall()
    out["levels"] = {r["level"]: r["n"] for r in levels}
    top = await (await conn.execute(TOP_RISKS, {"n": 5})).fetchall()
    out["top"] = top
    table = Table(title="Top churn risks (live accounts)", title_justify="left")
    for column in ("account", "level", "churn in 90 d", "days to churn", "main factors",
                   "change", "CSM"):  # fmt: skip
        table.add_column(
            column, justify="right" if column in ("churn in 90 d", "change") else "left"
        )
    for r in top:
        factors = ", ".join(f["label"] for f in (r["churn_factors"] or []))
        change = "new" if r["change"] is None else f"{r['change'] * 100:+.1f} pts"
        table.add_row(
            r["name"], r["level"], f"{r['churn_score'] * 100:.1f}%",
            "-" if r["churn_days"] is None else str(r["churn_days"]), factors, change,
            r["csm"] or "-",
        )  # fmt: skip
    console.print(table)
    console.print(
        "accounts by level: "
        + ", ".join(f"{k} {v:,}" for k, v in out["levels"].items())
        + " (live accounts); the risk page: /ui/risk",
        highlight=False,
    )
    out["realtime"] = await _realtime_signal(conn)
    out["feedback"] = await _false_positive(conn)
    return out


async def _realtime_signal(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any] | None:
    """Real time: the medium-risk account closest to high loses its key contact and opens
    two urgent tickets; the scorecard rescores it from the captured writes."""
    row = await (
        await conn.execute(
            "SELECT id, name, churn_score FROM accounts WHERE churned_at IS NULL"
            " AND churn_risk = 'medium' ORDER BY churn_score DESC, id LIMIT 1"
        )
    ).fetchone()
    if row is None:
        return None
    started = time.monotonic()
    await conn.execute(
        "UPDATE contacts SET left_at = now() WHERE id = (SELECT id FROM contacts"
        " WHERE account_id = %(id)s AND key_contact AND left_at IS NULL ORDER BY id LIMIT 1)",
        {"id": row["id"]},
    )
    await conn.execute(
        "INSERT INTO support_tickets (account_id, subject, priority)"
        " VALUES (%(id)s, 'Export broken', 'urgent'), (%(id)s, 'Considering options', 'high')",
        {"id": row["id"]},
    )
    after = row
    with console.status(f"real time: {row['name']} loses its key contact"):
        while time.monotonic() - started < 20:
            after = (
                await (
                    await conn.execute(
                        "SELECT churn_score, churn_risk::text AS level FROM accounts WHERE id = %s",
                        [row["id"]],
                    )
                ).fetchone()
                or row
            )
            if after["churn_score"] != row["churn_score"]:
                break
            await asyncio.sleep(0.1)
    seconds = time.monotonic() - started
    console.print(
        f"real time: {row['name']} lost its key contact and opened two urgent tickets:"
        f" churn risk {row['churn_score'] * 100:.1f}% -> {after['churn_score'] * 100:.1f}%"
        f" ({after.get('level', 'medium')}) {seconds:.1f} s after the writes",
        highlight=False,
    )
    return {"id": row["id"], "before": row["churn_score"], **after, "seconds": seconds}


async def _false_positive(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any] | None:
    """Feedback: the CSM of the top alert closes it as a false positive."""
    task = await (
        await conn.execute(
            "SELECT t.id, t.entity_id, t.title FROM tasks t JOIN accounts a"
            " ON a.id::text = t.entity_id WHERE t.title LIKE 'Churn risk:%%'"
            " AND t.completed_at IS NULL ORDER BY a.churn_score DESC NULLS LAST LIMIT 1"
        )
    ).fetchone()
    if task is None:
        return None
    await conn.execute(
        "UPDATE tasks SET outcome = 'false_positive', completed_at = now() WHERE id = %s",
        [task["id"]],
    )
    deadline = time.monotonic() + 20
    entry = None
    while time.monotonic() < deadline and entry is None:
        entry = await (
            await conn.execute(
                "SELECT s.until FROM crmflow.suppressions s WHERE s.list = 'churn_playbook'"
                " AND s.entity_key = jsonb_build_object('id', %s::bigint)",
                [task["entity_id"]],
            )
        ).fetchone()
        if entry is None:
            await asyncio.sleep(0.1)
    if entry is None:
        console.print("[yellow]feedback: the false positive was not recorded in time[/]")
        return None
    console.print(
        f"feedback: '{task['title']}' closed as a false positive: label recorded for the"
        f" next fit, the account is left out of the playbook until {entry['until']:%Y-%m-%d}",
        highlight=False,
    )
    return {"task": task["id"], "until": entry["until"]}


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
                if churn:
                    console.print("[bold]The churn-risk scenario[/]")
                    await churn_scenario(conn, churn_accounts)
                await _report(conn, time.monotonic() - started, url)
        finally:
            await worker.stop()
    return 0
