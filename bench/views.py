"""Reporting views on a long history: query times at 1M executions (100k with --quick)."""

from __future__ import annotations

import time
from typing import Any

from bench.harness import apply_active, median, prepare, scratch_database
from engine import db

# Each query with the bound it must stay under (seconds), as a BI tool would run it.
QUERIES: list[tuple[str, str, str, float]] = [
    (
        "V1",
        "execution_report, last 7 days",
        "SELECT * FROM crmflow.execution_report WHERE day >= (now() AT TIME ZONE 'UTC')::date - 7",
        0.5,
    ),
    ("V2", "execution_report, whole history", "SELECT * FROM crmflow.execution_report", 5.0),
    ("V3", "sla_report (30 days)", "SELECT * FROM crmflow.sla_report", 3.0),
    (
        "V4",
        "failures, newest 50",
        "SELECT * FROM crmflow.failures ORDER BY finished_at DESC LIMIT 50",
        0.5,
    ),
    ("V5", "outbox_lag", "SELECT * FROM crmflow.outbox_lag", 0.1),
    ("V6", "step_report", "SELECT * FROM crmflow.step_report", 5.0),
]

HISTORY = """
INSERT INTO crmflow.executions (workflow_id, workflow_version_id, workflow_version,
       enrollment_key, entity_type, entity_pk, status, triggered_at, started_at, finished_at,
       first_action_at, active_seconds, error)
SELECT v.workflow_id, v.id, 1, 'bench:' || i, 'lead', jsonb_build_object('id', i),
       CASE WHEN i %% 200 = 0 THEN 'failed' WHEN i %% 997 = 0 THEN 'waiting'
            ELSE 'completed' END,
       t, t, CASE WHEN i %% 997 <> 0 THEN t + interval '1 s' * (i %% 7) END,
       t + interval '3 ms' * (1 + i %% 11), 0.01 * (i %% 13),
       CASE WHEN i %% 200 = 0 THEN 'step create_task failed: boom' END
  FROM generate_series(1, %(n)s) AS i
  JOIN crmflow.workflow_versions AS v ON v.workflow_id = 1 + i %% %(workflows)s
 CROSS JOIN LATERAL (SELECT now() - interval '60 days' * (i::float8 / %(n)s) AS t) AS tt;
INSERT INTO crmflow.execution_steps (execution_id, step_id, position, type, status, attempts,
       started_at, finished_at, error)
SELECT x.id, 'create_task', 1, 'create_task',
       CASE WHEN x.status = 'failed' THEN 'failed' ELSE 'succeeded' END,
       CASE WHEN x.status = 'failed' THEN 3 ELSE 1 END,
       x.started_at, x.started_at + interval '4 ms', CASE WHEN x.status = 'failed' THEN 'boom' END
  FROM crmflow.executions AS x;
INSERT INTO crmflow.outbox (entity_type, op, pk, captured_at, processed_at, matched)
SELECT 'lead', 'insert', jsonb_build_object('id', i), t, t + interval '2 ms', 1
  FROM generate_series(1, %(n)s) AS i
 CROSS JOIN LATERAL (SELECT now() - interval '60 days' * (i::float8 / %(n)s) AS t) AS tt;
INSERT INTO crmflow.outbox (entity_type, op, pk) SELECT 'lead', 'insert', '{"id": 0}'
  FROM generate_series(1, 50);
ANALYZE crmflow.executions, crmflow.execution_steps, crmflow.outbox
"""


async def view_times(quick: bool) -> list[dict[str, Any]]:
    rows = 100_000 if quick else 1_000_000
    workflows = 10
    with scratch_database() as url:
        await prepare(url)
        await apply_active(
            url,
            [
                {
                    "name": f"wf {k}",
                    "trigger": {"type": "entity_created", "entity_type": "lead"},
                    "actions": [{"type": "create_task", "title": "t"}],
                }
                for k in range(workflows)
            ],
        )
        async with await db.connect(url, autocommit=True) as conn:
            # Making the history is setup, not a measured query: a million executions with
            # their checks and indexes take longer than an engine session's 30 s limit
            # (the full run died here: "canceling statement due to statement timeout").
            await conn.execute("SET statement_timeout = 0")
            for statement in HISTORY.split(";\n"):
                await conn.execute(statement, {"n": rows, "workflows": workflows})
            await conn.execute("RESET statement_timeout")  # the queries keep the limit
            results = []
            for key, what, query, bound in QUERIES:
                times = []
                for _ in range(3):
                    start = time.perf_counter()
                    await (await conn.execute(query)).fetchall()
                    times.append(time.perf_counter() - start)
                results.append(
                    {
                        "id": key,
                        "what": f"{what} ({rows:,} executions)",
                        "seconds": median(times),
                        "bound": bound,
                    }
                )
    return results
