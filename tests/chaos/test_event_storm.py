"""Scenario 5: an event storm. 100,000 rows land in a watched table in one statement
under a running worker, with rate-limited workflows: every event is matched, the rate
limits hold in every sliding minute, nothing is lost, and the worker's memory stays
bounded (it claims the outbox in batches)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.chaos.helpers import Figures, Process, report, start_worker
from tests.helpers import apply, value, wait_until

pytestmark = pytest.mark.chaos

ROWS = 100_000
DROP_LIMIT = 100  # per minute, extra starts dropped: 1,000 matching rows
WAIT_LIMIT = 20  # per minute, extra starts wait: 50 matching rows
PEAK_RSS_LIMIT_MB = 300

# The most starts of one workflow in any sliding minute (each start opens a window).
BUSIEST_MINUTE = """
SELECT coalesce(max(n), 0) FROM (
    SELECT (SELECT count(*) FROM crmflow.executions AS y
             WHERE y.workflow_id = x.workflow_id AND y.started_at >= x.started_at
               AND y.started_at < x.started_at + interval '1 minute') AS n
      FROM crmflow.executions AS x
     WHERE x.workflow_id = %s AND x.started_at IS NOT NULL
) AS windows
"""


async def test_event_storm_with_rate_limits(
    crm: psycopg.AsyncConnection[Any], db_url: str, procs: list[Process], log_dir: Path
) -> None:
    from engine import capture

    # Every row of the storm through the outbox and the matcher (capture would otherwise
    # keep only the 1,050 rows the workflows can match): the matcher's batches and the
    # worker's memory are what this scenario bounds.
    await capture.watch(crm, "leads", all_rows=True)
    dropping = await apply(
        crm,
        {
            "name": "Storm, over the rate dropped",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "conditions": [{"field": "source", "operator": "equals", "value": "storm_drop"}],
            "limits": {"max_per_minute": DROP_LIMIT, "on_rate_limit": "drop"},
            "actions": [{"type": "create_task", "title": "drop {{ lead.id }}"}],
        },
    )
    waiting = await apply(
        crm,
        {
            "name": "Storm, over the rate waits",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "conditions": [{"field": "source", "operator": "equals", "value": "storm_wait"}],
            "limits": {"max_per_minute": WAIT_LIMIT, "on_rate_limit": "wait"},
            "actions": [{"type": "create_task", "title": "wait {{ lead.id }}"}],
        },
    )
    worker = start_worker(db_url, log_dir, concurrency=10, CRMFLOW_MATCHER_POLL_INTERVAL="0.5")
    procs.append(worker)

    async def registered() -> bool:
        return await value(crm, "SELECT count(*) FROM crmflow.workers") == 1

    await wait_until(registered, timeout=60)
    worker.sample_rss()
    rss_idle_mb = worker.peak_rss_kb / 1024

    started = time.monotonic()
    await crm.execute(
        "INSERT INTO leads (name, source) SELECT 'storm ' || i, CASE"
        " WHEN i %% 100 = 0 THEN 'storm_drop' WHEN i %% 2000 = 1 THEN 'storm_wait'"
        " ELSE 'storm' END FROM generate_series(1, %s) i",
        [ROWS],
    )
    written = time.monotonic() - started
    expect_drop = ROWS // 100
    expect_wait = ROWS // 2000

    async def all_matched() -> bool:
        worker.sample_rss()
        return (
            await value(crm, "SELECT count(*) FROM crmflow.outbox WHERE processed_at IS NULL") == 0
        )

    await wait_until(all_matched, timeout=150, interval=0.5)
    matched_in = time.monotonic() - started

    async def first_window_settled() -> bool:
        worker.sample_rss()
        live = await value(
            crm,
            "SELECT count(*) FROM crmflow.executions WHERE workflow_id = %s"
            " AND status NOT IN ('completed', 'skipped')",
            dropping,
        )
        waited = await value(
            crm,
            "SELECT count(*) FROM crmflow.executions WHERE workflow_id = %s"
            " AND status = 'completed'",
            waiting,
        )
        return live == 0 and waited >= WAIT_LIMIT

    await wait_until(first_window_settled, timeout=60, interval=0.5)
    settled_in = time.monotonic() - started

    events = await value(crm, "SELECT count(*) FROM crmflow.outbox")
    errors = await value(crm, "SELECT count(*) FROM crmflow.outbox WHERE match_error IS NOT NULL")
    enrolled = await value(crm, "SELECT coalesce(sum(matched), 0) FROM crmflow.outbox")
    by_status = {
        (r["workflow_id"], r["status"]): r["n"]
        for r in await (
            await crm.execute(
                "SELECT workflow_id, status, count(*) AS n FROM crmflow.executions GROUP BY 1, 2"
            )
        ).fetchall()
    }
    busiest_drop = await value(crm, BUSIEST_MINUTE, dropping)
    busiest_wait = await value(crm, BUSIEST_MINUTE, waiting)
    lost = await value(
        crm,
        "SELECT count(*) FROM leads l WHERE l.source IN ('storm_drop', 'storm_wait')"
        " AND NOT EXISTS (SELECT 1 FROM crmflow.executions x"
        " WHERE x.entity_pk = jsonb_build_object('id', l.id))",
    )
    duplicated = await value(
        crm,
        "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM tasks GROUP BY title"
        " UNION ALL SELECT count(*) FROM crmflow.executions GROUP BY event_id, workflow_id) s",
    )
    completed = sum(n for (_, s), n in by_status.items() if s == "completed")
    tasks = await value(crm, "SELECT count(*) FROM tasks")
    waiting_pending = by_status.get((waiting, "pending"), 0)
    pending_with_time = await value(
        crm,
        "SELECT count(*) FROM crmflow.executions WHERE workflow_id = %s AND status = 'pending'"
        " AND not_before IS NOT NULL",
        waiting,
    )
    figures = Figures(
        "event-storm",
        events_captured=events,
        executions_completed=completed,
        duplicated_effects=duplicated,
        lost_events=lost,
        time_to_recover_s=matched_in,
        extra={
            "insert_s": round(written, 2),
            "matched_all_s": round(matched_in, 2),
            "events_per_s": round(ROWS / matched_in),
            "first_window_s": round(settled_in, 2),
            "dropped": by_status.get((dropping, "skipped"), 0),
            "busiest_minute_drop": f"{busiest_drop}/{DROP_LIMIT}",
            "busiest_minute_wait": f"{busiest_wait}/{WAIT_LIMIT}",
            "waiting_pending": waiting_pending,
            "rss_idle_mb": round(rss_idle_mb, 1),
        },
    )
    report(figures, [worker])
    assert events == ROWS and errors == 0
    assert enrolled == expect_drop + expect_wait
    assert lost == 0 and duplicated == 0
    assert busiest_drop <= DROP_LIMIT and busiest_wait <= WAIT_LIMIT
    # The limits let at least one minute's worth start; the rest were dropped or wait
    # (pending, with the time of their turn). Exact counts would assume the whole storm
    # is matched within one minute.
    drop_done = by_status.get((dropping, "completed"), 0)
    wait_done = by_status.get((waiting, "completed"), 0)
    assert drop_done >= DROP_LIMIT
    assert drop_done + by_status.get((dropping, "skipped"), 0) == expect_drop
    assert wait_done >= WAIT_LIMIT
    assert wait_done + waiting_pending == expect_wait
    assert waiting_pending == pending_with_time
    assert tasks == drop_done + wait_done
    assert figures.peak_rss_mb < PEAK_RSS_LIMIT_MB
    assert worker.alive()
