"""Inline steps never deadlock with the CRM's own transactions (docs/design.md, "The host
comes first").

Writers update three leads in ascending id order and then a deal, in one transaction,
while active ``field_updated`` workflows run ``update_field`` and ``create_task``
inline in the matcher's transaction. The matcher's writes to CRM rows take their locks
without waiting (an execution whose row is busy goes to the queue): no writer ever gets
``40P01 deadlock detected``, and every execution still runs exactly once."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from engine.config import Settings
from engine.worker import running_worker
from tests.helpers import apply, fetch, value, wait_until

LEADS = 30
DEALS = 10

LEAD_SCORE = {
    "name": "Lead score changed",
    "trigger": {"type": "field_updated", "entity_type": "lead", "fields": ["score"]},
    "actions": [
        {"type": "update_field", "field": "title", "value": "score {{ event.new.score }}"},
        {"type": "create_task", "title": "execution {{ execution.id }}"},
    ],
}
DEAL_AMOUNT = {
    "name": "Deal amount changed",
    "trigger": {"type": "field_updated", "entity_type": "deal", "fields": ["amount"]},
    "actions": [
        {"type": "update_field", "field": "stage", "value": "amount {{ event.new.amount }}"},
        {"type": "create_task", "title": "execution {{ execution.id }}"},
    ],
}


@dataclass
class WriterRun:
    commits: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


def run_writers(
    url: str, writers: int, seconds: float, leads: int = LEADS, deals: int = DEALS, seed: int = 12
) -> WriterRun:
    """``writers`` threads, each committing as fast as it can for ``seconds``: three leads
    in ascending id order, then a deal, in one transaction (the CRM's own connections:
    plain psycopg, no engine settings)."""
    run = WriterRun()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def writer(n: int) -> None:
        rng = random.Random(seed + n)
        with psycopg.connect(url) as conn:
            while time.monotonic() < deadline:
                some = sorted(rng.sample(range(1, leads + 1), 3))
                deal = rng.randint(1, deals)
                try:
                    with conn.transaction():
                        for lead in some:
                            conn.execute("UPDATE leads SET score = score + 1 WHERE id = %s", [lead])
                        conn.execute("UPDATE deals SET amount = amount + 1 WHERE id = %s", [deal])
                except psycopg.Error as exc:
                    with lock:
                        run.errors.append(f"{exc.sqlstate}: {exc.diag.message_primary}")
                    continue
                with lock:
                    run.commits += 1

    started = time.monotonic()
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run.seconds = time.monotonic() - started
    return run


async def setup_crm(
    crm: psycopg.AsyncConnection[Any], leads: int = LEADS, deals: int = DEALS
) -> None:
    await crm.execute(
        "INSERT INTO leads (id, name, score, owner_id)"
        " SELECT i, 'lead ' || i, 0, 1 FROM generate_series(1, %s) i",
        [leads],
    )
    await crm.execute(
        "INSERT INTO deals (id, name, amount, owner_id)"
        " SELECT i, 'deal ' || i, 0, 1 FROM generate_series(1, %s) i",
        [deals],
    )


async def check_every_execution_ran_once(
    crm: psycopg.AsyncConnection[Any], timeout: float = 120
) -> dict[str, Any]:
    """Every captured score/amount change (the writers' updates: depth 0) enrolled once,
    completed once, effects once (the events of paused workflows, matched = 0, aside)."""
    events = await value(
        crm,
        "SELECT count(*) FROM crmflow.outbox WHERE depth = 0 AND op = 'update'"
        " AND entity_type IN ('lead', 'deal') AND (processed_at IS NULL OR matched > 0)",
    )

    async def all_done() -> bool:
        done = await value(
            crm, "SELECT count(*) FROM crmflow.executions WHERE status = 'completed'"
        )
        return done >= events

    await wait_until(all_done, timeout=timeout, interval=0.25)
    statuses = await fetch(
        crm, "SELECT status, count(*) AS n FROM crmflow.executions GROUP BY status"
    )
    assert statuses == [{"status": "completed", "n": events}], statuses
    assert (
        await value(
            crm,
            "SELECT count(*) FROM crmflow.outbox o WHERE o.depth = 0 AND o.op = 'update'"
            " AND o.matched IS DISTINCT FROM 0"
            " AND NOT EXISTS (SELECT 1 FROM crmflow.executions x WHERE x.event_id = o.id)",
        )
        == 0
    )
    duplicated = await value(
        crm,
        "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM tasks GROUP BY title"
        " UNION ALL SELECT count(*) FROM crmflow.executions GROUP BY event_id) AS t",
    )
    assert duplicated == 0
    assert await value(crm, "SELECT count(*) FROM tasks") == events
    # The last execution of each entity ran last (per-entity order): its value stayed.
    assert (
        await value(
            crm,
            "SELECT count(*) FROM leads WHERE score > 0"
            " AND title IS DISTINCT FROM 'score ' || score",
        )
        == 0
    )
    assert (
        await value(
            crm,
            "SELECT count(*) FROM deals WHERE amount > 0"
            " AND split_part(stage, ' ', 2)::numeric IS DISTINCT FROM amount",
        )
        == 0
    )
    inline = await value(
        crm,
        "SELECT count(*) FROM crmflow.executions x WHERE NOT EXISTS"
        " (SELECT 1 FROM crmflow.execution_steps s WHERE s.execution_id = x.id"
        "   AND s.attempts <> 1)",
    )
    return {"events": events, "executions_completed_with_one_attempt_each": inline}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The suite's settings (tests/conftest.py) with the production default: inline steps."""
    return settings.model_copy(update={"inline_steps": True})


async def test_writers_never_deadlock_with_inline_steps(
    crm: psycopg.AsyncConnection[Any], db_url: str, settings: Settings
) -> None:
    await setup_crm(crm)
    await apply(crm, LEAD_SCORE)
    await apply(crm, DEAL_AMOUNT)
    from engine import metrics

    before = metrics.INLINE_FALLBACKS._value.get()
    async with running_worker(db_url, settings=settings, concurrency=4):
        run = await asyncio.to_thread(run_writers, db_url, 10, 5.0)
        figures = await check_every_execution_ran_once(crm)
    figures["to_the_queue"] = int(metrics.INLINE_FALLBACKS._value.get() - before)
    print(f"\nwriters: {run.commits} commits, {len(run.errors)} errors; {figures}")
    assert run.errors == []
    assert run.commits > 0


async def test_a_row_locked_by_the_crm_sends_its_executions_to_the_queue(
    crm: psycopg.AsyncConnection[Any], db_url: str, settings: Settings, pool: Any
) -> None:
    """The matcher does not wait for a lead a CRM transaction holds: that lead's
    executions (this one and the later ones) go to the queue, the others run inline."""
    from engine import metrics
    from engine.matcher import Matcher

    await setup_crm(crm)
    await apply(crm, LEAD_SCORE)
    await crm.execute("UPDATE leads SET score = 1 WHERE id IN (1, 2, 3)")
    await crm.execute("UPDATE leads SET score = 2 WHERE id = 2")
    before = metrics.INLINE_FALLBACKS._value.get()
    async with await psycopg.AsyncConnection.connect(db_url) as app:
        await app.execute("UPDATE leads SET name = 'held' WHERE id = 2")  # open transaction
        started = time.monotonic()
        assert (await Matcher(pool, settings).drain()).enrolled == 4
        assert time.monotonic() - started < 1.5  # lock_timeout is 2 s: it did not wait
        rows = await fetch(
            crm,
            "SELECT x.entity_pk ->> 'id' AS lead, x.status FROM crmflow.executions x ORDER BY x.id",
        )
        assert rows == [
            {"lead": "1", "status": "completed"},
            {"lead": "2", "status": "pending"},
            {"lead": "3", "status": "completed"},
            {"lead": "2", "status": "pending"},  # behind the first one, in the queue too
        ]
        assert await value(crm, "SELECT count(*) FROM crmflow.execution_queue") == 2
        await app.rollback()
    assert metrics.INLINE_FALLBACKS._value.get() == before + 2  # executions, not rows
    assert await value(crm, "SELECT title FROM leads WHERE id = 1") == "score 1"


async def test_a_queued_step_waits_for_a_busy_crm_row_within_its_own_timeout(
    crm: psycopg.AsyncConnection[Any], db_url: str, settings: Settings, pool: Any
) -> None:
    """The step runner's wait for a row the CRM holds is bounded by the step's timeout,
    not by the session's 2 s lock_timeout: a CRM transaction 3 s long costs no attempt."""
    from engine.matcher import Matcher
    from engine.runtime import Runner
    from tests.helpers import run_job

    await setup_crm(crm)
    await apply(crm, LEAD_SCORE)
    await crm.execute("UPDATE leads SET score = 1 WHERE id = 1")
    async with await psycopg.AsyncConnection.connect(db_url) as app:
        await app.execute("UPDATE leads SET name = 'held' WHERE id = 1")
        await Matcher(pool, settings).drain()  # busy: to the queue
        [execution_id] = [r["id"] for r in await fetch(crm, "SELECT id FROM crmflow.executions")]

        async def release() -> None:
            await asyncio.sleep(3.0)
            await app.commit()

        releasing = asyncio.create_task(release())
        assert await run_job(Runner(pool, settings), crm, execution_id) == "completed"
        await releasing
    steps = await fetch(
        crm, "SELECT status, attempts FROM crmflow.execution_steps ORDER BY position"
    )
    assert steps == [{"status": "succeeded", "attempts": 1}] * 2
    assert await value(crm, "SELECT title FROM leads WHERE id = 1") == "score 1"
