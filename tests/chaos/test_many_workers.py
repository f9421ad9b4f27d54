"""Scenario 4: four worker processes on one database, a few thousand events over a
hundred entities. Every event enrolls exactly once, every execution completes once, and
one entity's executions run in its events' order, never overlapping."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.chaos.helpers import Figures, Process, report, start_worker
from tests.helpers import apply, value, wait_until

pytestmark = pytest.mark.chaos

WORKERS = 4
ENTITIES = 100
ROUNDS = 30
PER_ROUND = 70  # entities updated per round: 2,100 events

# Each step records the score its event saw; per lead, those must rise in run order.
OUT_OF_ORDER = """
WITH t AS (
    SELECT split_part(label, ':', 1) AS lead, split_part(label, ':', 2)::int AS score, at, id
      FROM test_trace
)
SELECT count(*) FROM (
    SELECT score, lag(score) OVER (PARTITION BY lead ORDER BY at, id) AS previous FROM t
) AS s WHERE previous >= score
"""
# An execution of a lead that started before the lead's previous execution finished.
OVERLAPPING = """
SELECT count(*) FROM (
    SELECT started_at, lag(finished_at) OVER (PARTITION BY entity_pk ORDER BY event_id)
           AS previous_finished
      FROM crmflow.executions
) AS s WHERE started_at < previous_finished
"""
DUPLICATES = """
SELECT coalesce(sum(n - 1), 0) FROM (
    SELECT count(*) AS n FROM test_trace GROUP BY label
    UNION ALL SELECT count(*) FROM tasks GROUP BY title
    UNION ALL SELECT count(*) FROM crmflow.executions GROUP BY event_id
) AS effects
"""


async def test_four_workers_one_database(
    crm: psycopg.AsyncConnection[Any], db_url: str, procs: list[Process], log_dir: Path
) -> None:
    await crm.execute(
        "INSERT INTO leads (name, score) SELECT 'lead ' || i, 0 FROM generate_series(1, %s) i",
        [ENTITIES],
    )
    await apply(
        crm,
        {
            "name": "Score changes, in order",
            "trigger": {"type": "field_updated", "entity_type": "lead", "fields": ["score"]},
            "actions": [
                {"type": "create_task", "title": "execution {{ execution.id }}"},
                {
                    "type": "test_sleep",
                    "seconds": 0.002,
                    "label": "{{ execution.entity_id }}:{{ event.new.score }}",
                },
            ],
        },
    )
    workers = [start_worker(db_url, log_dir, f"worker-{i}") for i in range(WORKERS)]
    procs += workers

    async def all_registered() -> bool:
        return await value(crm, "SELECT count(*) FROM crmflow.workers") == WORKERS

    await wait_until(all_registered, timeout=60)
    rng = random.Random(7)
    started = time.monotonic()
    for _ in range(ROUNDS):
        ids = rng.sample(range(1, ENTITIES + 1), PER_ROUND)
        await crm.execute("UPDATE leads SET score = score + 1 WHERE id = ANY(%s)", [ids])
        await asyncio.sleep(0.05)
    expected = ROUNDS * PER_ROUND

    async def all_completed() -> bool:
        n = await value(crm, "SELECT count(*) FROM crmflow.executions WHERE status = 'completed'")
        return n >= expected

    await wait_until(all_completed, timeout=240, interval=0.25)
    elapsed = time.monotonic() - started
    events = await value(crm, "SELECT count(*) FROM crmflow.outbox WHERE op = 'update'")
    completed = await value(
        crm, "SELECT count(*) FROM crmflow.executions WHERE status = 'completed'"
    )
    lost = await value(
        crm,
        "SELECT count(*) FROM crmflow.outbox o WHERE o.op = 'update' AND NOT EXISTS"
        " (SELECT 1 FROM crmflow.executions x WHERE x.event_id = o.id)",
    )
    duplicated = await value(crm, DUPLICATES)
    out_of_order = await value(crm, OUT_OF_ORDER)
    overlapping = await value(crm, OVERLAPPING)
    traces = await value(crm, "SELECT count(*) FROM test_trace")
    report(
        Figures(
            "four-workers",
            events_captured=events,
            executions_completed=completed,
            duplicated_effects=duplicated,
            lost_events=lost,
            time_to_recover_s=None,
            extra={
                "workers": WORKERS,
                "drain_s": round(elapsed, 2),
                "executions_per_s": round(completed / elapsed, 1),
                "out_of_order": out_of_order,
                "overlapping": overlapping,
            },
        ),
        workers,
    )
    assert events == expected
    assert completed == expected and traces == expected
    assert lost == 0 and duplicated == 0
    assert out_of_order == 0, "an entity's executions ran out of event order"
    assert overlapping == 0, "two executions of one entity overlapped"
    assert all(w.alive() for w in workers)
