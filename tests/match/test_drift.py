"""Schema drift isolates (docs/design.md, "The host comes first"): a workflow whose predicate
no longer compiles is left out of the match statement and marked broken with its reason;
every other workflow goes on matching; the broken one's events are kept for it and are
replayed once it compiles again. Plus the matcher's per-batch bounds (statement timeout,
bytes)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from engine import alerts, capture, catalog, workflows
from engine.config import Settings
from engine.matcher import Matcher, replay_events
from tests.helpers import apply, fetch, value, wait_until
from tests.paths import REPO

ON_LEAD = {
    "name": "Hot leads",
    "trigger": {"type": "entity_created", "entity_type": "lead"},
    "conditions": [{"field": "score", "operator": "greater_than", "value": 50}],
    "actions": [{"type": "send_notification", "message": "hot", "recipient": 3}],
}
ON_DEAL = {
    "name": "Won",
    "trigger": {"type": "field_updated", "entity_type": "deal", "field": "status", "to": "won"},
    "actions": [{"type": "send_notification", "message": "won", "recipient": 3}],
}


async def executions(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    return await fetch(conn, "SELECT * FROM crmflow.executions ORDER BY id")


async def workflow(conn: psycopg.AsyncConnection[Any], wf_id: int) -> dict[str, Any]:
    [row] = await fetch(conn, "SELECT * FROM crmflow.workflows WHERE id = %s", wf_id)
    return row


async def two_workflows(crm: psycopg.AsyncConnection[Any], matcher: Matcher) -> tuple[int, int]:
    """One workflow on leads, one on deals; a deal to win; the plan built before the
    drift (so the first failure comes at run time, not at the plan build)."""
    lead_wf = await apply(crm, ON_LEAD)
    deal_wf = await apply(crm, ON_DEAL)
    await crm.execute("INSERT INTO deals (name) VALUES ('big')")
    await crm.execute("INSERT INTO leads (name, score) VALUES ('before', 90)")
    await matcher.drain()
    assert len(await executions(crm)) == 1
    return lead_wf, deal_wf


async def writes_after_drift(crm: psycopg.AsyncConnection[Any], lead_sql: str) -> None:
    await crm.execute(lead_sql)
    await crm.execute("UPDATE deals SET status = 'won'")


async def assert_isolated(
    crm: psycopg.AsyncConnection[Any], matcher: Matcher, lead_wf: int, deal_wf: int, what: str
) -> dict[str, Any]:
    result = await matcher.drain()
    assert result.errors == 0
    rows = await executions(crm)
    assert [r["workflow_id"] for r in rows] == [lead_wf, deal_wf]  # the deal still matched
    assert await value(crm, "SELECT count(*) FROM crmflow.outbox WHERE processed_at IS NULL") == 0
    assert (
        await value(crm, "SELECT count(*) FROM crmflow.outbox WHERE match_error IS NOT NULL") == 0
    )
    wf = await workflow(crm, lead_wf)
    assert wf["broken_reason"] and what in wf["broken_reason"], wf["broken_reason"]
    assert wf["broken_since_event_id"] is not None
    lead_event = await value(
        crm, "SELECT max(id) FROM crmflow.outbox WHERE entity_type = 'lead' AND op = 'insert'"
    )
    assert wf["broken_since_event_id"] <= lead_event
    assert (await workflow(crm, deal_wf))["broken_reason"] is None
    return wf


@pytest.mark.parametrize(
    ("ddl", "lead_sql", "what", "fix"),
    [
        (
            "ALTER TABLE leads DROP COLUMN score",
            "INSERT INTO leads (name) VALUES ('after')",
            "score",
            "ALTER TABLE leads ADD COLUMN score integer",
        ),
        (
            "ALTER TABLE leads RENAME COLUMN score TO points",
            "INSERT INTO leads (name, points) VALUES ('after', 95)",
            "score",
            "ALTER TABLE leads RENAME COLUMN points TO score",
        ),
        (
            "ALTER TABLE leads ALTER COLUMN score TYPE text",
            "INSERT INTO leads (name, score) VALUES ('after', '95')",
            "operator does not exist",
            "ALTER TABLE leads ALTER COLUMN score TYPE integer USING score::integer",
        ),
        (
            # Without the DDL event trigger (crmflow installed by a non-superuser), capture
            # follows the rename only when the worker heals, seconds later.
            "DROP EVENT TRIGGER crmflow_heal_capture; ALTER TABLE leads RENAME TO prospects",
            "INSERT INTO prospects (name, score) VALUES ('after', 95)",
            "public.leads",
            "SELECT * FROM crmflow.heal_capture()",
        ),
    ],
    ids=["drop-column", "rename-column", "alter-type", "rename-table"],
)
async def test_drift_breaks_one_workflow_only_and_replay_recovers(
    crm: psycopg.AsyncConnection[Any],
    matcher: Matcher,
    ddl: str,
    lead_sql: str,
    what: str,
    fix: str,
) -> None:
    lead_wf, deal_wf = await two_workflows(crm, matcher)
    await crm.execute(ddl)
    await writes_after_drift(crm, lead_sql)
    await assert_isolated(crm, matcher, lead_wf, deal_wf, what)
    # A later save (another workflow) keeps it broken: nothing is dropped silently.
    await apply(crm, {**ON_DEAL, "name": "Won 2"})
    await crm.execute("INSERT INTO deals (name) VALUES ('later')")
    await matcher.drain()
    assert (await workflow(crm, lead_wf))["broken_reason"]
    # Replay refuses while it does not compile.
    with pytest.raises(workflows.StillBroken):
        await replay_events(crm, lead_wf)
    await crm.execute(fix)
    matcher.broken_recheck = 0  # the next probe of broken workflows (10 s by default)
    await matcher.drain()  # sees it compiles again
    wf = await workflow(crm, lead_wf)
    assert wf["broken_reason"] is None and wf["broken_since_event_id"] is not None
    report = await replay_events(crm, lead_wf)
    assert report["events"] >= 1
    again = await replay_events(crm, lead_wf)  # idempotent
    assert again["enrolled"] == 0
    rows = await executions(crm)
    lead_rows = [r for r in rows if r["workflow_id"] == lead_wf]
    if "TYPE" in ddl or "RENAME TO" in ddl:
        # the captured row still has score: the missed lead matches now
        assert len(lead_rows) == 2, lead_rows
    assert (await workflow(crm, lead_wf))["broken_since_event_id"] is None


async def test_drop_table_breaks_its_workflow_and_unwatch_works(
    crm: psycopg.AsyncConnection[Any], matcher: Matcher
) -> None:
    lead_wf, deal_wf = await two_workflows(crm, matcher)
    await crm.execute("DROP TABLE leads CASCADE")
    await crm.execute("UPDATE deals SET status = 'won'")
    await matcher.drain()
    assert [r["workflow_id"] for r in await executions(crm)] == [lead_wf, deal_wf]
    assert "public.leads" in (await workflow(crm, lead_wf))["broken_reason"]
    states = {s["entity_type"]: s for s in await catalog.entity_states(crm)}
    assert states["lead"]["state"] == "table missing"
    assert states["deal"]["state"] == "ok"
    await capture.unwatch(crm, "leads", force=True)
    assert "lead" not in {s["entity_type"] for s in await catalog.entity_states(crm)}


async def test_a_renamed_table_followed_by_capture_breaks_nothing(
    crm: psycopg.AsyncConnection[Any], matcher: Matcher
) -> None:
    lead_wf, deal_wf = await two_workflows(crm, matcher)
    await crm.execute("ALTER TABLE leads RENAME TO prospects")  # the event trigger heals
    await writes_after_drift(crm, "INSERT INTO prospects (name, score) VALUES ('after', 95)")
    await matcher.drain()
    assert sorted(r["workflow_id"] for r in await executions(crm)) == [lead_wf, lead_wf, deal_wf]
    assert (await workflow(crm, lead_wf))["broken_reason"] is None


async def test_renamed_table_entities_and_unwatch(
    crm: psycopg.AsyncConnection[Any], db_url: str
) -> None:
    await crm.execute("DROP EVENT TRIGGER crmflow_heal_capture")
    await crm.execute("ALTER TABLE leads RENAME TO prospects")
    states = {s["entity_type"]: s for s in await catalog.entity_states(crm)}
    assert states["lead"]["state"].startswith("table renamed"), states["lead"]
    assert "public.prospects" in states["lead"]["state"]
    out = crmflow(db_url, "entities")
    assert out.returncode == 0 and "renamed" in out.stdout, out
    out = crmflow(db_url, "unwatch", "leads")
    assert out.returncode == 0, out.stderr
    out = crmflow(db_url, "entities")
    assert "lead " not in out.stdout
    # the triggers are gone from the renamed table: a write captures nothing
    before = await value(crm, "SELECT count(*) FROM crmflow.outbox")
    await crm.execute("INSERT INTO prospects (name) VALUES ('x')")
    assert await value(crm, "SELECT count(*) FROM crmflow.outbox") == before


async def test_primary_key_change_is_reported(crm: psycopg.AsyncConnection[Any]) -> None:
    await crm.execute("DROP EVENT TRIGGER crmflow_heal_capture")
    await crm.execute("ALTER TABLE contacts RENAME COLUMN id TO contact_id")
    states = {s["entity_type"]: s for s in await catalog.entity_states(crm)}
    assert states["contact"]["state"].startswith("key changed"), states["contact"]


async def test_enum_rename_used_by_a_derived_field(
    crm: psycopg.AsyncConnection[Any], matcher: Matcher, db_url: str, tmp_path: Path
) -> None:
    await capture.watch(crm, "public.accounts", derived={"risk": "churn_risk"})
    risky = await apply(
        crm,
        {
            "name": "Risky",
            "trigger": {"type": "entity_updated", "entity_type": "account"},
            "conditions": [{"field": "risk", "operator": "equals", "value": "high"}],
            "actions": [{"type": "send_notification", "message": "risk", "recipient": 3}],
        },
    )
    deal_wf = await apply(crm, ON_DEAL)
    await crm.execute("INSERT INTO accounts (name) VALUES ('acme')")
    await crm.execute("INSERT INTO deals (name) VALUES ('big')")
    await matcher.drain()
    await crm.execute("ALTER TYPE churn_risk_level RENAME TO risk_level")
    await crm.execute("UPDATE accounts SET churn_risk = 'high'")
    await crm.execute("UPDATE deals SET status = 'won'")
    await matcher.drain()  # does not stop
    assert [r["workflow_id"] for r in await executions(crm)] == [deal_wf]
    entity = await catalog.load_entity(crm, "account")
    assert entity is not None and entity.derived["risk"].kind == "enum"
    reason = (await workflow(crm, risky))["broken_reason"]
    assert reason and "churn_risk_level" in reason
    # apply of an unrelated file works, and warns about the broken workflow
    path = tmp_path / "other.json"
    path.write_text(
        '{"name": "Other", "trigger": {"type": "entity_created", '
        '"entity_type": "deal"}, "actions": [{"type": "send_notification", '
        '"message": "x", "recipient": 3}], "status": "active"}'
    )
    out = crmflow(db_url, "workflow", "apply", str(path))
    assert out.returncode == 0, out.stderr
    assert "broken" in out.stderr and "Risky" in out.stderr
    # re-applying the same definition recompiles it against the renamed type
    definition = (await workflows.get_workflow(crm, risky))["definition"]
    saved = await workflows.apply(crm, {**definition, "status": "active"})
    assert saved.new_version
    await matcher.drain()
    assert (await workflow(crm, risky))["broken_reason"] is None
    report = await replay_events(crm, risky)
    assert report["enrolled"] == 1


async def test_the_operator_is_told(
    crm: psycopg.AsyncConnection[Any],
    matcher: Matcher,
    client: Any,
    db_url: str,
    settings: Settings,
) -> None:
    lead_wf, deal_wf = await two_workflows(crm, matcher)
    await crm.execute("ALTER TABLE leads RENAME COLUMN score TO points")
    await writes_after_drift(crm, "INSERT INTO leads (name, points) VALUES ('after', 95)")
    await matcher.drain()
    listed = {w["id"]: w for w in (await client.get("/workflows")).json()}
    assert listed[lead_wf]["broken"] is True and "score" in listed[lead_wf]["broken_reason"]
    assert listed[deal_wf]["broken"] is False
    one = (await client.get(f"/workflows/{lead_wf}")).json()
    assert one["broken"] and one["broken_since_event_id"]
    health = (await client.get("/health")).json()
    assert health["status"] == "degraded"
    assert [w["id"] for w in health["broken_workflows"]] == [lead_wf]
    metrics = (await client.get("/metrics")).text
    assert "crmflow_workflows_broken 1.0" in metrics
    # the matcher raised the alert when it found the workflow broken
    [alert] = await fetch(crm, "SELECT * FROM crmflow.alerts WHERE kind = 'workflow_broken'")
    assert alert["workflow_id"] == lead_wf and "score" in alert["message"]
    assert alert["resolved_at"] is None
    # the periodic check catches up with one missed, and resolves none that still holds
    await crm.execute("DELETE FROM crmflow.alerts")
    changes = await alerts.check(crm, settings)
    assert [(c.kind, c.raised) for c in changes] == [("workflow_broken", True)]
    page = await client.get("/ui/workflows")
    assert page.status_code in (200, 303)
    out = crmflow(db_url, "workflow", "list")
    assert "broken" in out.stdout, out
    out = crmflow(db_url, "workflow", "show", str(lead_wf))
    assert "broken" in out.stdout and "score" in out.stdout, out
    # replay refused over the API while broken, then works once fixed
    refused = await client.post(f"/workflows/{lead_wf}/replay-events")
    assert refused.status_code == 409, refused.text
    await crm.execute("ALTER TABLE leads RENAME COLUMN points TO score")
    ok = await client.post(f"/workflows/{lead_wf}/replay-events")
    assert ok.status_code == 200, ok.text
    assert ok.json()["workflow_id"] == lead_wf
    assert (await client.get("/health")).json()["broken_workflows"] == []
    assert (
        await value(crm, "SELECT count(*) FROM crmflow.alerts WHERE resolved_at IS NULL") == 0
    )  # resolved when it compiled again
    out = crmflow(db_url, "workflow", "replay-events", str(lead_wf))
    assert out.returncode == 0, out.stderr


async def test_dashboard_shows_broken(
    crm: psycopg.AsyncConnection[Any], matcher: Matcher, api_app: Any, api_keys: dict[str, str]
) -> None:
    import httpx

    await two_workflows(crm, matcher)
    await crm.execute("ALTER TABLE leads DROP COLUMN score")
    await crm.execute("INSERT INTO leads (name) VALUES ('x')")
    await matcher.drain()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api_app), base_url="http://testserver"
    ) as ui:
        login = await ui.post(
            "/ui/login", data={"key": api_keys["read"]}, headers={"Origin": "http://testserver"}
        )
        assert login.status_code in (200, 303)
        page = await ui.get("/ui/workflows")
    assert page.status_code == 200
    assert "broken" in page.text and "score" in page.text


def crmflow(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"CRMFLOW_DATABASE_URL": db_url, "PATH": "/usr/bin:/bin", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=REPO,
    )


# ───────────────────────────── per-batch bounds ─────────────────────────────


async def test_a_slow_event_times_out_alone(
    crm: psycopg.AsyncConnection[Any], pool: AsyncConnectionPool, settings: Settings
) -> None:
    wf = await apply(crm, ON_LEAD)
    # A predicate slow on one row only (no user condition can sleep: written directly;
    # its capture filter, made from the definition, goes with the definition's predicate).
    await crm.execute(
        "UPDATE crmflow.workflow_versions SET predicate = "
        "'(CASE WHEN n.name = ''slow'' THEN pg_sleep(2) IS NULL ELSE true END)', "
        "capture_filter = NULL WHERE workflow_id = %s",
        [wf],
    )
    await crm.execute("INSERT INTO leads (name) VALUES ('a'), ('slow'), ('b')")
    matcher = Matcher(pool, settings.model_copy(update={"matcher_statement_timeout": 0.3}))
    result = await asyncio.wait_for(matcher.drain(), 10)
    assert result.claimed == 3 and result.errors == 1
    rows = await executions(crm)
    assert [r["entity_pk"]["id"] for r in rows] == [1, 3]
    [slow] = await fetch(crm, "SELECT * FROM crmflow.outbox WHERE match_error IS NOT NULL")
    assert slow["pk"] == {"id": 2} and "CRMFLOW_MATCHER_STATEMENT_TIMEOUT" in slow["match_error"]


async def test_batches_are_bounded_in_bytes(
    crm: psycopg.AsyncConnection[Any], pool: AsyncConnectionPool, settings: Settings
) -> None:
    await apply(crm, ON_LEAD)
    # Whole rows stored: ON_LEAD does not read company (capture would leave it out).
    await capture.watch(crm, "leads", all_columns=True)
    # incompressible ~300 kB values (md5 chains), five rows
    await crm.execute(
        "INSERT INTO leads (name, score, company) SELECT 'big' || i, 99, "
        "(SELECT string_agg(md5(i::text || j::text), '') FROM generate_series(1, 10000) j) "
        "FROM generate_series(1, 5) i"
    )
    size = await value(crm, "SELECT max(pg_column_size(new_row)) FROM crmflow.outbox")
    assert size > 100_000
    matcher = Matcher(pool, settings.model_copy(update={"matcher_batch_bytes": int(size * 1.5)}))
    sizes = []
    while (r := await matcher.run_once()).claimed:
        sizes.append(r.claimed)
    assert sizes == [2, 2, 1]
    tiny = Matcher(pool, settings.model_copy(update={"matcher_batch_bytes": 1}))
    await crm.execute("INSERT INTO leads (name, score) VALUES ('a', 99), ('b', 99)")
    assert (await tiny.run_once()).claimed == 1  # always at least one event


async def test_a_key_rename_before_capture_heals_poisons_nothing(
    crm: psycopg.AsyncConnection[Any], matcher: Matcher
) -> None:
    await crm.execute("DROP EVENT TRIGGER crmflow_heal_capture")  # heal comes later
    contact_wf = await apply(
        crm,
        {
            "name": "New contact",
            "trigger": {"type": "entity_created", "entity_type": "contact"},
            "actions": [{"type": "send_notification", "message": "hi", "recipient": 3}],
        },
    )
    deal_wf = await apply(crm, ON_DEAL)
    await crm.execute("INSERT INTO deals (name) VALUES ('big')")
    await crm.execute("INSERT INTO contacts (name) VALUES ('before')")
    await matcher.drain()
    await crm.execute("ALTER TABLE contacts RENAME COLUMN id TO contact_id")
    await crm.execute("INSERT INTO contacts (name) VALUES ('after')")
    await crm.execute("UPDATE deals SET status = 'won'")
    result = await matcher.drain()
    assert result.errors == 0
    assert (
        await value(crm, "SELECT count(*) FROM crmflow.outbox WHERE match_error IS NOT NULL") == 0
    )
    rows = await executions(crm)
    assert sorted(r["workflow_id"] for r in rows) == sorted([contact_wf, contact_wf, deal_wf])
    assert (await workflow(crm, contact_wf))["broken_reason"] is None


async def test_rows_that_cannot_be_read_by_their_key_break_their_workflows_only(
    crm: psycopg.AsyncConnection[Any], matcher: Matcher
) -> None:
    """The match statement reads each entity's current row by its key: a table left with
    no primary key (and the stored key column gone) breaks its workflows, not the batch."""
    await crm.execute("DROP EVENT TRIGGER crmflow_heal_capture")
    contact_wf = await apply(
        crm,
        {
            "name": "New contact",
            "trigger": {"type": "entity_created", "entity_type": "contact"},
            "actions": [{"type": "send_notification", "message": "hi", "recipient": 3}],
        },
    )
    deal_wf = await apply(crm, ON_DEAL)
    await crm.execute("INSERT INTO deals (name) VALUES ('big')")
    await matcher.drain()
    await crm.execute("ALTER TABLE contacts DROP COLUMN id CASCADE")
    await crm.execute("UPDATE deals SET status = 'won'")
    result = await matcher.drain()
    assert result.errors == 0
    assert [r["workflow_id"] for r in await executions(crm)] == [deal_wf]
    reason = (await workflow(crm, contact_wf))["broken_reason"]
    assert reason and "cannot be read by their key" in reason


async def test_drift_under_load_with_a_running_worker(
    crm: psycopg.AsyncConnection[Any], db_url: str, worker: Any
) -> None:
    """Writers keep writing leads and deals while a column a workflow reads is renamed
    away and back: no writer error, every deal event matched once, the lead workflow
    broken meanwhile, and after the replay every lead event enrolled exactly once."""
    lead_wf = await apply(
        crm,
        {
            "name": "Unscored leads",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "conditions": [{"field": "score", "operator": "is_empty"}],
            "actions": [{"type": "send_notification", "message": "new", "recipient": 3}],
        },
    )
    deal_wf = await apply(
        crm,
        {
            "name": "Any deal",
            "trigger": {"type": "entity_created", "entity_type": "deal"},
            "actions": [{"type": "send_notification", "message": "deal", "recipient": 3}],
        },
    )
    stop = asyncio.Event()
    errors: list[str] = []

    async def writer() -> None:
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as w:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    await w.execute("INSERT INTO leads (name) VALUES (%s)", [f"l{i}"])
                    await w.execute("INSERT INTO deals (name) VALUES (%s)", [f"d{i}"])
                except psycopg.Error as exc:
                    errors.append(str(exc))
                await asyncio.sleep(0.01)

    task = asyncio.create_task(writer())
    await asyncio.sleep(1.0)
    await crm.execute("ALTER TABLE leads RENAME COLUMN score TO points")

    async def broken() -> bool:
        return bool((await workflow(crm, lead_wf))["broken_reason"])

    await wait_until(broken, timeout=10)
    await asyncio.sleep(1.0)
    await crm.execute("ALTER TABLE leads RENAME COLUMN points TO score")
    await asyncio.sleep(0.5)
    stop.set()
    await task
    assert errors == []

    async def drained() -> bool:
        return not await value(
            crm, "SELECT count(*) FROM crmflow.outbox WHERE processed_at IS NULL"
        )

    await wait_until(drained, timeout=20)
    report = await replay_events(crm, lead_wf)
    assert report["events"] > 0
    assert (
        await value(crm, "SELECT count(*) FROM crmflow.outbox WHERE match_error IS NOT NULL") == 0
    )
    counts = await fetch(
        crm,
        "SELECT o.entity_type, count(x.id) AS n, count(DISTINCT o.id) AS events"
        "  FROM crmflow.outbox AS o LEFT JOIN crmflow.executions AS x ON x.event_id = o.id"
        " WHERE o.op = 'insert' AND o.entity_type IN ('lead', 'deal')"
        " GROUP BY o.entity_type ORDER BY 1",
    )
    # every insert of both entities enrolled exactly once
    assert [(c["entity_type"], c["n"] == c["events"]) for c in counts] == [
        ("deal", True),
        ("lead", True),
    ], counts
    per_event = await value(
        crm,
        "SELECT max(n) FROM (SELECT count(*) AS n FROM crmflow.executions GROUP BY event_id) AS c",
    )
    assert per_event == 1
    assert {r["workflow_id"] for r in await executions(crm)} == {lead_wf, deal_wf}
