"""`environment`: a workflow enrolls only on workers of its environment
(CRMFLOW_ENVIRONMENT, default production). Two environments' workers share one
database: each still sees every event for its own workflows, whichever matcher claimed
it; scheduled ticks, manual runs and custom events follow the same rule."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from engine import events
from engine.config import Settings
from engine.matcher import Matcher
from engine.scheduler import NotRunnable, Scheduler, run_now
from engine.worker import running_worker
from tests.helpers import apply, fetch, value, wait_executions_settled

Conn = psycopg.AsyncConnection[Any]


def on_new_lead(name: str, environment: str | None) -> dict[str, Any]:
    definition: dict[str, Any] = {
        "name": name,
        "trigger": {"type": "entity_created", "entity_type": "lead"},
        "actions": [{"type": "update_field", "field": "status", "value": "contacted"}],
    }
    if environment:
        definition["environment"] = environment
    return definition


async def enrolled(conn: Conn) -> dict[int, list[int]]:
    """workflow id → the lead ids it enrolled, each once."""
    rows = await fetch(
        conn,
        "SELECT workflow_id, entity_pk FROM crmflow.executions ORDER BY workflow_id, entity_pk",
    )
    found: dict[int, list[int]] = {}
    for r in rows:
        found.setdefault(r["workflow_id"], []).append(r["entity_pk"]["id"])
    return found


def in_environment(settings: Settings, environment: str) -> Settings:
    return settings.model_copy(update={"environment": environment})


async def test_two_environments_matchers_share_one_database(
    crm: Conn, pool: AsyncConnectionPool, settings: Settings
) -> None:
    prod_wf = await apply(crm, on_new_lead("Production welcome", None))
    staging_wf = await apply(crm, on_new_lead("Staging welcome", "staging"))
    pinged = await apply(
        crm,
        {
            "name": "Staging ping",
            "environment": "staging",
            "trigger": {"type": "event", "event": "ping", "entity_type": "lead"},
            "actions": [{"type": "update_field", "field": "score", "value": 5}],
        },
    )
    production = Matcher(pool, settings)
    staging = Matcher(pool, in_environment(settings, "staging"))

    # The staging matcher claims the events first: it enrolls its own workflow and
    # queues the events for production, whose matcher enrolls its workflow on them.
    await crm.execute("INSERT INTO leads (name) VALUES ('a'), ('b')")
    await staging.drain()
    assert await enrolled(crm) == {staging_wf: [1, 2]}
    assert await value(crm, "SELECT count(*) FROM crmflow.environment_events") == 2
    await production.drain()
    assert await enrolled(crm) == {prod_wf: [1, 2], staging_wf: [1, 2]}
    assert await value(crm, "SELECT count(*) FROM crmflow.environment_events") == 0

    # The other way round, and a custom event about a lead.
    await crm.execute("INSERT INTO leads (name) VALUES ('c')")
    await events.ingest(crm, "ping", entity_type="lead", entity_id=1)
    await production.drain()
    assert (await enrolled(crm)).get(pinged) is None
    await staging.drain()
    assert await enrolled(crm) == {
        prod_wf: [1, 2, 3],
        staging_wf: [1, 2, 3],
        pinged: [1],
    }

    # Both at once, over a burst: every event reaches both environments once.
    await crm.execute("INSERT INTO leads (name) SELECT 'lead ' || g FROM generate_series(1, 200) g")
    for _ in range(3):
        await asyncio.gather(production.drain(), staging.drain())
    found = await enrolled(crm)
    assert found[prod_wf] == list(range(1, 204)) and found[staging_wf] == list(range(1, 204))
    assert await value(crm, "SELECT count(*) FROM crmflow.environment_events") == 0
    assert await value(crm, "SELECT count(*) FROM crmflow.outbox WHERE processed_at IS NULL") == 0


async def test_one_environment_queues_nothing(
    crm: Conn, pool: AsyncConnectionPool, settings: Settings
) -> None:
    """All workflows of one environment (the usual case): the plan queues for nobody,
    so the matcher runs no statement more than before."""
    await apply(crm, on_new_lead("Production welcome", None))
    await apply(crm, on_new_lead("Also production", "production"))
    matcher = Matcher(pool, settings)
    await crm.execute("INSERT INTO leads (name) VALUES ('a')")
    await matcher.drain()
    assert matcher.plan is not None and matcher.plan.elsewhere == []
    assert await value(crm, "SELECT count(*) FROM crmflow.executions") == 2
    assert await value(crm, "SELECT count(*) FROM crmflow.environment_events") == 0


async def test_ticks_and_manual_runs_follow_the_environment(
    crm: Conn, pool: AsyncConnectionPool, settings: Settings
) -> None:
    await crm.execute("INSERT INTO deals (name, status) VALUES ('a', 'open'), ('b', 'open')")
    nightly = await apply(
        crm,
        {
            "name": "Staging nightly",
            "environment": "staging",
            "trigger": {"type": "scheduled", "schedule": "0 3 * * *", "entity_type": "deal"},
            "actions": [{"type": "update_field", "field": "amount", "value": 1}],
        },
    )
    production, staging = (
        Scheduler(pool, settings),
        Scheduler(pool, in_environment(settings, "staging")),
    )
    await production.sync()
    await crm.execute("UPDATE crmflow.schedules SET next_run_at = now() - interval '1 second'")
    assert await production.tick() == 0  # not its environment: the tick stays due
    assert await staging.tick() == 2
    assert (
        await value(crm, "SELECT count(*) FROM crmflow.executions WHERE workflow_id = %s", nightly)
        == 2
    )

    with pytest.raises(NotRunnable, match="environment 'staging'"):
        await run_now(crm, nightly, settings=settings)
    assert len(await run_now(crm, nightly, settings=in_environment(settings, "staging"))) == 2


async def test_two_workers_of_two_environments_on_one_database(
    crm: Conn, db_url: str, settings: Settings
) -> None:
    prod_wf = await apply(crm, on_new_lead("Production welcome", None))
    staging_wf = await apply(crm, on_new_lead("Staging welcome", "staging"))
    async with (
        running_worker(db_url, settings=settings, concurrency=2),
        running_worker(db_url, settings=in_environment(settings, "staging"), concurrency=2),
    ):
        await crm.execute(
            "INSERT INTO leads (name) SELECT 'lead ' || g FROM generate_series(1, 20) g"
        )
        done = await wait_executions_settled(crm, expected=40)
    assert {x["status"] for x in done} == {"completed"}
    found = await enrolled(crm)
    assert found == {prod_wf: list(range(1, 21)), staging_wf: list(range(1, 21))}


async def test_a_worker_of_an_environment_without_workflows_enrolls_nothing(
    crm: Conn, pool: AsyncConnectionPool, settings: Settings
) -> None:
    await apply(crm, on_new_lead("Staging welcome", "staging"))
    production = Matcher(pool, settings)
    await crm.execute("INSERT INTO leads (name) VALUES ('a')")
    await production.drain()
    assert await value(crm, "SELECT count(*) FROM crmflow.executions") == 0
    assert await value(crm, "SELECT count(*) FROM crmflow.environment_events") == 1
    # a staging worker started later still finds it
    await Matcher(pool, in_environment(settings, "staging")).drain()
    assert await value(crm, "SELECT count(*) FROM crmflow.executions") == 1


def test_the_environment_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="environment"):
        Settings(environment="no spaces allowed")


async def test_a_poisoned_event_queued_for_an_environment_is_set_aside(
    crm: Conn, pool: AsyncConnectionPool, settings: Settings
) -> None:
    """A queued event that breaks the environment's batch (a sql condition dividing by
    zero on it) is matched alone, dropped from the queue with its error on its outbox row;
    the other events of the batch enroll."""
    await apply(crm, on_new_lead("Production welcome", None))
    risky = await apply(
        crm,
        {
            **on_new_lead("Staging scoring", "staging"),
            "conditions": [{"sql": "100 / (score - 5) > 0"}],
        },
    )
    await crm.execute("INSERT INTO leads (name, score) VALUES ('a', 6), ('poison', 5), ('c', 7)")
    await Matcher(pool, settings).drain()  # production claims and queues them for staging
    assert await value(crm, "SELECT count(*) FROM crmflow.environment_events") == 3
    result = await Matcher(pool, in_environment(settings, "staging")).drain()
    assert result.errors == 1
    assert (await enrolled(crm))[risky] == [1, 3]
    assert await value(crm, "SELECT count(*) FROM crmflow.environment_events") == 0
    error = await value(crm, "SELECT match_error FROM crmflow.outbox WHERE pk = '{\"id\": 2}'")
    assert error.startswith("environment staging: division by zero")


async def test_the_docs_example(crm: Conn, pool: AsyncConnectionPool, settings: Settings) -> None:
    from tests.actions.test_dedupe import docs_example

    wf = await apply(crm, docs_example("Try the new welcome mail"))
    await crm.execute("INSERT INTO leads (name, email) VALUES ('a', 'a@example.com')")
    await Matcher(pool, settings).drain()
    assert await enrolled(crm) == {}
    await Matcher(pool, in_environment(settings, "staging")).drain()
    assert await enrolled(crm) == {wf: [1]}
