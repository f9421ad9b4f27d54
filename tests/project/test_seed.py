"""`crmflow migrate && crmflow seed` on a fresh database, then the writes a CRM makes: each
pre-configured workflow of examples/workflows/ does its job on a real worker (issue 13,
items 9 and 11)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from engine import db
from engine.config import Settings
from engine.scheduler import run_now
from engine.seed import seed
from engine.worker import Worker, running_worker
from tests.helpers import fetch, value, wait_until


def crmflow(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        env={**os.environ, "CRMFLOW_DATABASE_URL": url, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def worker_settings(url: str) -> Settings:
    # The production defaults (inline steps on), polling fast for the test.
    return Settings(database_url=url, matcher_poll_interval=0.05, heartbeat_interval=0.5)


async def problems(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    """Failed executions and steps, and steps skipped for want of a user (not those
    skipped by their 'when', nor the churn playbook's CSM and sponsor already assigned
    on a later level change)."""
    return await fetch(
        conn,
        "SELECT w.name, x.status, x.error, s.step_id, s.status AS step_status,"
        " s.error AS step_error, s.result"
        " FROM crmflow.executions x JOIN crmflow.workflows w ON w.id = x.workflow_id"
        " LEFT JOIN crmflow.execution_steps s ON s.execution_id = x.id"
        " WHERE x.status = 'failed' OR s.status = 'failed'"
        " OR (s.status = 'skipped' AND s.result->>'reason' NOT LIKE '''when'' was false%%'"
        " AND s.result->>'reason' NOT LIKE 'already assigned to %%')",
    )


async def pause_churn_scorecard(conn: psycopg.AsyncConnection[Any]) -> None:
    """These tests set accounts' churn_risk by hand, as a CRM without the scorecard would:
    the churn scorecard, paused, does not rescore them (in real time it would write its
    own level back)."""
    from engine.scorecards import store

    definition = (await store.get(conn, "account_churn_risk"))["definition"]
    await store.apply(conn, {**definition, "status": "paused"})


async def settle(conn: psycopg.AsyncConnection[Any]) -> None:
    """Until no event waits for the matcher and no execution is pending or running (a
    step delayed for later, enrich_lead's 60 s, may wait)."""

    async def settled() -> bool:
        [row] = await fetch(
            conn,
            "SELECT (SELECT count(*) FROM crmflow.outbox WHERE processed_at IS NULL) AS backlog,"
            " (SELECT count(*) FROM crmflow.executions WHERE status IN ('pending', 'running'))"
            " AS live",
        )
        return row["backlog"] == 0 and row["live"] == 0

    await wait_until(settled, timeout=20)


async def users_by_role(conn: psycopg.AsyncConnection[Any], role: str) -> list[int]:
    rows = await fetch(conn, "SELECT id FROM users WHERE role = %s AND active ORDER BY id", role)
    return [r["id"] for r in rows]


async def test_after_migrate_and_seed_every_preconfigured_workflow_does_its_job(
    empty_db: str,
) -> None:
    for command in ("migrate", "seed"):
        done = crmflow(empty_db, command)
        assert done.returncode == 0, done.stderr[-3000:]
    # seed says what it added for the workflows to work with.
    assert "example users" in done.stdout, done.stdout
    for role in ("sales_rep", "csm", "manager"):
        assert role in done.stdout, done.stdout

    async with (
        await db.connect(empty_db, autocommit=True) as conn,
        running_worker(empty_db, settings=worker_settings(empty_db), concurrency=4),
    ):
        await pause_churn_scorecard(conn)
        [rep, *_] = await users_by_role(conn, "sales_rep")
        csms = await users_by_role(conn, "csm")
        managers = await users_by_role(conn, "manager")
        assert csms and managers
        await conn.execute(
            "INSERT INTO leads (name, email, company, source) VALUES"
            " ('Grace Hopper', 'grace@navy.test', 'Navy', 'website_form')"
        )
        await conn.execute(
            "INSERT INTO accounts (name, arr) VALUES ('Globex', 180000), ('Umbrella', 95000)"
        )
        await conn.execute(
            "INSERT INTO deals (name, account_id, owner_id, amount, last_activity_at) VALUES"
            " ('Stale pilot', 1, %(rep)s, 15000, now() - interval '10 days'),"
            " ('Hooli platform', 2, %(rep)s, 120000, now())",
            {"rep": rep},
        )
        await conn.execute("UPDATE deals SET status = 'won' WHERE name = 'Hooli platform'")
        await conn.execute("UPDATE accounts SET churn_risk = 'high' WHERE name = 'Umbrella'")
        await conn.execute("UPDATE accounts SET churn_risk = 'critical' WHERE name = 'Globex'")
        await conn.execute(
            "INSERT INTO crmflow.alerts (kind, subject, value, threshold, message)"
            " VALUES ('outbox_age', 'outbox', 120, 60, 'the outbox is 120 s behind')"
        )
        stale = await value(
            conn, "SELECT id FROM crmflow.workflows WHERE name = 'Follow up on stale deals'"
        )
        await run_now(conn, stale)  # its daily 09:00 run, now
        await settle(conn)
        # Umbrella's CSM closes its churn alert as a false positive (the feedback workflow).
        await conn.execute(
            "UPDATE tasks SET outcome = 'false_positive', completed_at = now()"
            " WHERE title LIKE 'Churn risk: Umbrella%'"
        )
        await settle(conn)

        assert await problems(conn) == []
        fired = {
            r["name"]: r["n"]
            for r in await fetch(
                conn,
                "SELECT w.name, count(x.id) AS n FROM crmflow.workflows w"
                " LEFT JOIN crmflow.executions x ON x.workflow_id = w.id GROUP BY w.name",
            )
        }
        assert all(fired.values()), fired  # every pre-configured workflow ran

        # Auto-qualify: scored and qualified now (enrich_lead waits its 60 s).
        lead = (await fetch(conn, "SELECT status, score FROM leads"))[0]
        assert lead["status"] != "new" and lead["score"] is not None, lead
        # Stale deals: a high-priority follow-up for the deal's owner.
        assert await fetch(
            conn, "SELECT title, priority, assignee_id FROM tasks WHERE title LIKE 'Follow%%'"
        ) == [{"title": "Follow up on Stale pilot", "priority": "high", "assignee_id": rep}]
        notes = await fetch(
            conn, "SELECT recipient_id, message FROM notifications ORDER BY recipient_id, id"
        )
        told = {(n["recipient_id"], n["message"].split(" (")[0]) for n in notes}
        # Deal won: the owner and every manager.
        assert (rep, "Deal won: Hooli platform") in told
        assert all((m, "Hooli platform was won") in told for m in managers)
        # Churn playbook: a CSM, an urgent success plan and a notification for each.
        accounts = await fetch(conn, "SELECT name, csm_id FROM accounts ORDER BY name")
        assert all(a["csm_id"] in csms for a in accounts), accounts
        plans = await fetch(
            conn,
            "SELECT t.title, t.priority, t.assignee_id, a.csm_id FROM tasks t"
            " JOIN accounts a ON t.title LIKE '%%' || a.name || '%%'"
            " WHERE t.title LIKE 'Success plan%%' ORDER BY t.title",
        )
        assert [(p["title"], p["priority"]) for p in plans] == [
            ("Success plan for Globex (churn risk critical)", "urgent"),
            ("Success plan for Umbrella (churn risk high)", "urgent"),
        ]
        assert all(p["assignee_id"] == p["csm_id"] for p in plans)
        for a in accounts:
            assert any(r == a["csm_id"] and a["name"] in m for r, m in told), (a, told)
        # Critical risk escalates to every manager; high does not.
        escalations = [n for n in notes if n["message"].startswith("Critical churn risk")]
        assert sorted(n["recipient_id"] for n in escalations) == managers
        assert all("Globex" in n["message"] for n in escalations)
        # crmflow's own alert reaches the managers.
        assert all((m, "crmflow alert: the outbox is 120 s behind") in told for m in managers)


@pytest.fixture
async def seeded(db_url: str) -> AsyncIterator[tuple[psycopg.AsyncConnection[Any], Worker]]:
    """The template's example CRM after `seed` (watched, workflows, example users), with a
    worker."""
    async with await db.connect(db_url, autocommit=True) as conn:
        await seed(conn, Settings(database_url=db_url))
        await pause_churn_scorecard(conn)
        async with running_worker(db_url, settings=worker_settings(db_url), concurrency=4) as w:
            yield conn, w


async def escalations(conn: psycopg.AsyncConnection[Any], account: str) -> int:
    return int(
        await value(
            conn,
            "SELECT count(*) FROM notifications n JOIN users u ON u.id = n.recipient_id"
            " WHERE u.role = 'manager' AND n.message LIKE 'Critical churn risk on ' || %s || ' %%'",
            account,
        )
    )


async def test_churn_risk_going_from_high_to_critical_escalates(
    seeded: tuple[psycopg.AsyncConnection[Any], Worker],
) -> None:
    conn, _ = seeded
    managers = len(await users_by_role(conn, "manager"))
    await conn.execute("INSERT INTO accounts (name, arr) VALUES ('Umbrella', 95000)")
    await conn.execute("UPDATE accounts SET churn_risk = 'high'")
    await settle(conn)
    assert await escalations(conn, "Umbrella") == 0
    plans = "SELECT count(*) FROM tasks WHERE title LIKE 'Success plan for Umbrella%%'"
    assert await value(conn, plans) == 1
    # high → critical: the managers are told, once each; the CSM's plan stands.
    await conn.execute("UPDATE accounts SET churn_risk = 'critical'")
    await settle(conn)
    assert await escalations(conn, "Umbrella") == managers
    assert await value(conn, plans) == 1
    # back to high, and critical again: one more escalation; nothing on the way down.
    await conn.execute("UPDATE accounts SET churn_risk = 'high'")
    await conn.execute("UPDATE accounts SET churn_risk = 'critical'")
    await settle(conn)
    assert await escalations(conn, "Umbrella") == 2 * managers
    assert await value(conn, plans) == 1
    assert await problems(conn) == []


async def test_churn_risk_from_low_straight_to_critical_runs_the_playbook_and_escalates_once(
    seeded: tuple[psycopg.AsyncConnection[Any], Worker],
) -> None:
    conn, _ = seeded
    managers = len(await users_by_role(conn, "manager"))
    await conn.execute("INSERT INTO accounts (name, arr) VALUES ('Globex', 180000)")
    await conn.execute("UPDATE accounts SET churn_risk = 'critical'")
    await settle(conn)
    assert await escalations(conn, "Globex") == managers
    assert (
        await value(conn, "SELECT count(*) FROM tasks WHERE title LIKE 'Success plan for Globex%%'")
        == 1
    )
    assert await value(conn, "SELECT csm_id IS NOT NULL FROM accounts")
    assert await problems(conn) == []


async def test_seed_keeps_a_crms_own_users_and_says_which_roles_are_missing(
    db_url: str, conn: psycopg.AsyncConnection[Any]
) -> None:
    await conn.execute("INSERT INTO users (name, role) VALUES ('Our rep', 'sales_rep')")
    done = crmflow(db_url, "seed")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no example users added" in done.stdout, done.stdout
    warnings = [ln for ln in done.stdout.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2 and "'csm'" in warnings[0] and "'manager'" in warnings[1]
    assert await value(conn, "SELECT array_agg(name) FROM users") == ["Our rep"]


async def test_seed_adds_the_example_users_once(db_url: str) -> None:
    async with await db.connect(db_url, autocommit=True) as conn:
        settings = Settings(database_url=db_url)
        first = await seed(conn, settings)
        assert [u["role"] for u in first.users] == [
            "sales_rep",
            "sales_rep",
            "csm",
            "csm",
            "manager",
        ]
        assert first.missing_roles == []
        again = await seed(conn, settings)
        assert again.users == [] and again.missing_roles == []
        assert await value(conn, "SELECT count(*) FROM users") == 5
