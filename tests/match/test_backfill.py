"""Backfill (engine/backfill.py): an event workflow enrolls the rows that already match
it, set-based in batches keyed by primary key, once per row, within --limit, through the
normal executor; a dry run only counts; CRM writers are never blocked by a batch."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from engine import backfill, db, suppressions
from engine.config import Settings
from tests.helpers import apply, fetch, value, wait_until

MARK = {
    "name": "Mark web leads",
    "trigger": {"type": "entity_created", "entity_type": "lead"},
    "conditions": [{"field": "source", "operator": "equals", "value": "web"}],
    "actions": [{"type": "update_field", "field": "status", "value": "backfilled"}],
}
ROWS = 2_500  # 1,250 of them from 'web'


async def leads(conn: psycopg.AsyncConnection[Any], n: int = ROWS) -> None:
    await conn.execute(
        "INSERT INTO leads (name, source)"
        " SELECT 'lead ' || i, CASE WHEN i %% 2 = 0 THEN 'web' ELSE 'ads' END"
        " FROM generate_series(1, %s) AS i",
        [n],
    )


async def executions(conn: psycopg.AsyncConnection[Any]) -> int:
    return int(await value(conn, "SELECT count(*) FROM crmflow.executions"))


async def test_dry_run_limit_run_and_an_idempotent_second_run(
    crm: psycopg.AsyncConnection[Any], settings: Settings, worker: Any
) -> None:
    await leads(crm)
    wf = await apply(crm, MARK)  # after the rows: their inserts enroll nothing
    dry = await backfill.run(crm, wf, dry_run=True, settings=settings)
    assert (dry.scanned, dry.matched, dry.enrolled, dry.batches) == (ROWS, 1250, 1250, 3)
    assert await executions(crm) == 0  # a dry run changes nothing

    first = await backfill.run(crm, wf, limit=100, settings=settings)
    assert first.enrolled == 100 and len(first.execution_ids) == 100
    rest = await backfill.run(crm, wf, batch_size=400, settings=settings)
    assert rest.enrolled == 1150 and rest.skipped == 100 and rest.batches == 7
    again = await backfill.run(crm, wf, settings=settings)
    assert again.enrolled == 0 and again.matched == 1250
    assert (await backfill.run(crm, wf, dry_run=True, settings=settings)).enrolled == 0
    rows = await fetch(
        crm,
        "SELECT count(*) AS n, count(DISTINCT entity_pk) AS entities,"
        " bool_and(enrollment_key = 'backfill:' || entity_pk::text) AS keyed,"
        " bool_and(event_id IS NULL) AS no_event"
        " FROM crmflow.executions WHERE workflow_id = %s",
        wf,
    )
    assert rows == [{"n": 1250, "entities": 1250, "keyed": True, "no_event": True}]

    # The normal executor runs them: every web lead is marked, no other.
    async def done() -> bool:
        return (
            await value(crm, "SELECT count(*) FROM crmflow.executions WHERE status = 'completed'")
            == 1250
        )

    await wait_until(done, timeout=60)
    marked = await fetch(
        crm, "SELECT source, count(*) AS n FROM leads WHERE status = 'backfilled' GROUP BY 1"
    )
    assert marked == [{"source": "web", "n": 1250}]


async def test_the_reenrollment_policy_applies(
    crm: psycopg.AsyncConnection[Any], settings: Settings
) -> None:
    await leads(crm, 10)
    wf = await apply(crm, {**MARK, "limits": {"reenrollment": "never"}})
    # Lead 2 was enrolled already (by an event, say): "never" keeps it out.
    await crm.execute(
        "INSERT INTO crmflow.executions (workflow_id, workflow_version_id, workflow_version,"
        " enrollment_key, entity_type, entity_pk, status, priority, depth, triggered_at)"
        " SELECT w.id, v.id, v.version, 'event:0', 'lead', '{\"id\": 2}', 'completed', 0, 0,"
        " now() FROM crmflow.workflows w JOIN crmflow.workflow_versions v ON v.workflow_id = w.id"
        " WHERE w.id = %s",
        [wf],
    )
    report = await backfill.run(crm, wf, dry_run=True, settings=settings)
    assert (report.matched, report.enrolled) == (5, 4)


async def test_suppression_lists_keep_their_entities_out(
    crm: psycopg.AsyncConnection[Any], settings: Settings
) -> None:
    await leads(crm, 10)
    await crm.execute("UPDATE leads SET email = 'lead' || id || '@acme.test'")
    wf = await apply(crm, {**MARK, "suppress": ["vip", "unsubscribed"]})
    await suppressions.add(crm, "vip", entity_type="lead", key=2)
    await suppressions.add(crm, "unsubscribed", email="LEAD4@acme.test")
    await suppressions.add(crm, "other", entity_type="lead", key=6)  # not the workflow's
    report = await backfill.run(crm, wf, settings=settings)
    assert (report.matched, report.enrolled) == (5, 3)
    enrolled = await fetch(crm, "SELECT entity_pk->>'id' AS id FROM crmflow.executions ORDER BY 1")
    assert [r["id"] for r in enrolled] == ["10", "6", "8"]


@pytest.mark.parametrize(
    ("definition", "path", "reason"),
    [
        (
            {
                "name": "Nightly",
                "trigger": {"type": "scheduled", "entity_type": "lead", "schedule": "0 3 * * *"},
                "actions": [{"type": "qualify_lead"}],
            },
            "trigger.type",
            "is triggered by scheduled: only entity_created, entity_updated, field_updated",
        ),
        (
            {
                "name": "Deleted",
                "trigger": {"type": "entity_deleted", "entity_type": "lead"},
                "actions": [{"type": "send_notification", "recipient": 1, "message": "x"}],
            },
            "trigger.type",
            "is triggered by entity_deleted",
        ),
        (
            {
                "name": "Changed",
                "trigger": {"type": "entity_updated", "entity_type": "lead"},
                "conditions": [{"field": "status", "operator": "changed"}],
                "actions": [{"type": "qualify_lead"}],
            },
            "conditions[0]",
            "without its previous values",
        ),
        (
            {
                "name": "From",
                "trigger": {
                    "type": "field_updated",
                    "entity_type": "lead",
                    "field": "status",
                    "from": "new",
                },
                "actions": [{"type": "qualify_lead"}],
            },
            "trigger.from",
            "with 'from' cannot be backfilled",
        ),
    ],
)
async def test_refused_with_the_reason_naming_the_path(
    crm: psycopg.AsyncConnection[Any],
    settings: Settings,
    definition: dict[str, Any],
    path: str,
    reason: str,
) -> None:
    wf = await apply(crm, definition)
    with pytest.raises(backfill.BackfillRefused, match=reason) as refused:
        await backfill.run(crm, wf, settings=settings)
    assert (refused.value.path or "").startswith(path)
    assert await executions(crm) == 0


async def test_field_updated_to_is_required_of_the_row_now(
    crm: psycopg.AsyncConnection[Any], settings: Settings
) -> None:
    await crm.execute(
        "INSERT INTO leads (name, status)"
        " VALUES ('a', 'qualified'), ('b', 'new'), ('c', 'qualified')"
    )
    wf = await apply(
        crm,
        {
            "name": "Qualified",
            "trigger": {
                "type": "field_updated",
                "entity_type": "lead",
                "field": "status",
                "to": "qualified",
            },
            "actions": [{"type": "qualify_lead"}],
        },
    )
    assert (await backfill.run(crm, wf, dry_run=True, settings=settings)).enrolled == 2
    paused = await apply(crm, {**MARK, "status": "paused"})
    with pytest.raises(backfill.BackfillRefused, match="paused: activate it"):
        await backfill.run(crm, paused, settings=settings)


async def test_a_batch_never_blocks_a_crm_writer(
    crm: psycopg.AsyncConnection[Any], settings: Settings, db_url: str
) -> None:
    await leads(crm, 2_000)
    wf = await apply(crm, MARK)
    plan = await backfill.plan(crm, wf)
    params = backfill.batch_params(plan, settings, 1000, datetime.now(UTC))
    async with await db.connect(db_url, autocommit=True) as writer:
        await writer.execute("SET lock_timeout = '2s'")
        # A batch's transaction left open: the rows it read (and enrolled) stay writable.
        async with crm.transaction():
            row = await (
                await crm.execute(backfill.statement(plan, dry_run=False, first=True), params)
            ).fetchone()
            assert row is not None and row["enrolled"] == 500
            locks = await fetch(
                crm,
                "SELECT mode FROM pg_locks WHERE relation = 'public.leads'::regclass"
                " AND pid = pg_backend_pid()",
            )
            assert {r["mode"] for r in locks} == {"AccessShareLock"}
            started = time.monotonic()
            await writer.execute("UPDATE leads SET score = 1 WHERE id IN (2, 4, 500)")
            await writer.execute("UPDATE leads SET source = 'ads' WHERE id = 1998")
            assert time.monotonic() - started < 1.0

        # And during a whole backfill in small batches: each write completes at once.
        latencies: list[float] = []

        async def write() -> None:
            for i in range(40):
                started = time.monotonic()
                await writer.execute(
                    "UPDATE leads SET score = %s WHERE id = %s", [i, 1001 + (i * 23) % 999]
                )
                latencies.append(time.monotonic() - started)
                await asyncio.sleep(0.005)

        run = asyncio.create_task(backfill.run(crm, wf, batch_size=100, settings=settings))
        await write()
        report = await run
        assert report.enrolled == 499  # 1,000 web leads, 500 enrolled, lead 1998 now 'ads'
        assert max(latencies) < 1.0, latencies


async def test_cli_and_api(crm: psycopg.AsyncConnection[Any], db_url: str, client: Any) -> None:
    await leads(crm, 30)
    wf = await apply(crm, MARK)
    env = {**os.environ, "CRMFLOW_DATABASE_URL": db_url}

    def cli(*args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "engine.cli", "workflow", "backfill", *args],
            capture_output=True,
            text=True,
            env={**env, **extra_env},
            timeout=60,
        )
        # Rich wraps long lines at the terminal's width: compare words.
        result.stdout = " ".join(result.stdout.split())
        result.stderr = " ".join(result.stderr.split())
        return result

    dry = cli(str(wf), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "15 row(s) would enroll" in dry.stdout and "nothing was changed" in dry.stdout
    assert await executions(crm) == 0
    limited = cli("Mark web leads", "--limit", "5", "--json")
    assert limited.returncode == 0, limited.stderr
    assert json.loads(limited.stdout)["enrolled"] == 5
    bad = cli(str(wf), "--limit", "0")
    assert bad.returncode == 2 and "at least 1" in bad.stderr

    response = await client.post(f"/workflows/{wf}/backfill", json={"dry_run": True})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "workflow_id": wf,
        "dry_run": True,
        "scanned": 30,
        "matched": 15,
        "enrolled": 10,
        "skipped": 5,
        "batches": 1,
        "limit": None,
    }
    response = await client.post(f"/workflows/{wf}/backfill", json={"limit": 4})
    assert response.json()["enrolled"] == 4
    response = await client.post(f"/workflows/{wf}/backfill")
    assert response.json()["enrolled"] == 6
    assert await executions(crm) == 15

    scheduled = await apply(
        crm,
        {
            "name": "Nightly",
            "trigger": {"type": "scheduled", "entity_type": "lead", "schedule": "0 3 * * *"},
            "actions": [{"type": "qualify_lead"}],
        },
    )
    refused = await client.post(f"/workflows/{scheduled}/backfill", json={})
    assert refused.status_code == 409
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert refused.json()["errors"][0]["path"] == "trigger.type"
    assert "scheduled" in refused.json()["detail"]
    cli_refused = cli("Nightly")
    assert cli_refused.returncode == 1 and "triggered by scheduled" in cli_refused.stderr
    # On a terminal, a progress bar (rows read, executions enrolled) on stderr.
    shown = cli(str(wf), "--batch-size", "10", TTY_COMPATIBLE="1", TTY_INTERACTIVE="1")
    assert shown.returncode == 0, shown.stderr
    assert "enrolling Mark web leads" in shown.stderr and "rows" in shown.stderr
    assert "0 enrolled" in shown.stdout
    unknown = await client.post(f"/workflows/{wf}/backfill", json={"dryrun": True})
    assert unknown.status_code == 422
    assert (await client.post("/workflows/999999/backfill")).status_code == 404


async def test_a_composite_primary_key_is_batched_in_key_order(
    crm: psycopg.AsyncConnection[Any], settings: Settings
) -> None:
    from engine import capture

    await crm.execute(
        "CREATE TABLE memberships (org int, member text, role text, PRIMARY KEY (org, member))"
    )
    await crm.execute(
        "INSERT INTO memberships SELECT o, 'm' || m, CASE WHEN m % 3 = 0 THEN 'admin' END"
        " FROM generate_series(1, 4) AS o, generate_series(1, 9) AS m"
    )
    await capture.watch(crm, "public.memberships")
    wf = await apply(
        crm,
        {
            "name": "Admins",
            "trigger": {"type": "entity_created", "entity_type": "membership"},
            "conditions": [{"field": "role", "operator": "equals", "value": "admin"}],
            "actions": [{"type": "update_field", "field": "role", "value": "owner"}],
        },
    )
    report = await backfill.run(crm, wf, batch_size=5, settings=settings)
    assert (report.scanned, report.matched, report.enrolled, report.batches) == (36, 12, 12, 8)
    keys = await fetch(
        crm,
        "SELECT entity_pk FROM crmflow.executions ORDER BY entity_pk->>'org', entity_pk->>'member'",
    )
    assert len({json.dumps(k["entity_pk"], sort_keys=True) for k in keys}) == 12
    assert (await backfill.run(crm, wf, batch_size=7, settings=settings)).enrolled == 0


async def test_the_rate_limit_applies_to_backfilled_executions(
    crm: psycopg.AsyncConnection[Any], settings: Settings, worker: Any
) -> None:
    await leads(crm, 20)
    wf = await apply(crm, {**MARK, "limits": {"max_per_minute": 3, "on_rate_limit": "drop"}})
    assert (await backfill.run(crm, wf, settings=settings)).enrolled == 10

    async def settled() -> bool:
        live = await value(
            crm,
            "SELECT count(*) FROM crmflow.executions WHERE status IN ('pending', 'running')",
        )
        return bool(live == 0)

    await wait_until(settled, timeout=60)
    statuses = await fetch(
        crm, "SELECT status, count(*) AS n FROM crmflow.executions GROUP BY 1 ORDER BY 1"
    )
    assert statuses == [{"status": "completed", "n": 3}, {"status": "skipped", "n": 7}]


async def test_a_pause_during_a_backfill_stops_it(
    crm: psycopg.AsyncConnection[Any], settings: Settings, db_url: str
) -> None:
    await leads(crm, 100)
    wf = await apply(crm, MARK)

    def pause_after_the_first_batch(batch: backfill.Batch) -> None:
        with psycopg.connect(db_url, autocommit=True) as other:
            other.execute("UPDATE crmflow.workflows SET status = 'paused' WHERE id = %s", [wf])

    with pytest.raises(backfill.BackfillRefused, match=r"paused.*\(10 enrolled until then\)"):
        await backfill.run(
            crm, wf, batch_size=20, settings=settings, progress=pause_after_the_first_batch
        )
    assert await executions(crm) == 10
