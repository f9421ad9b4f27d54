"""The CRM side of ``crmflow demo`` (``engine.demo``): what a sales team writes in a few
minutes (leads, accounts, deals), the local enrichment endpoint the ``enrich_lead``
workflow calls, whether the workflows have settled, and the console every part of the
demo prints to."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from rich.console import Console

from engine.seed import EXAMPLE_USERS

console = Console()

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


async def writes(conn: psycopg.AsyncConnection[Any]) -> dict[str, int]:
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


async def settled(conn: psycopg.AsyncConnection[Any], wait_delayed: bool) -> bool:
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
