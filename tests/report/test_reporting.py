"""Reporting views on a known history, /metrics, and alerts delivered by a workflow."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import alerts
from engine.config import Settings
from engine.matcher import Matcher
from engine.runtime import Runner
from tests.helpers import apply, fetch, value
from tests.paths import REPO

HISTORY = """
-- Two workflows; for "A" on day D: 3 completed, 1 failed (at a step), 1 pending; for
-- "B" on day D-1: 1 completed and 1 failed by the loop limit (no step).
INSERT INTO crmflow.executions (id, workflow_id, workflow_version_id, workflow_version,
    enrollment_key, entity_type, entity_pk, status, triggered_at, started_at, finished_at,
    first_action_at, active_seconds, error)
OVERRIDING SYSTEM VALUE VALUES
 (1, %(a)s, %(av)s, 1, 'k1', 'lead', '{"id": 1}', 'completed', %(d)s, %(d)s,
  %(d)s::timestamptz + interval '2 s', %(d)s::timestamptz + interval '0.1 s', 1.0, NULL),
 (2, %(a)s, %(av)s, 1, 'k2', 'lead', '{"id": 2}', 'completed', %(d)s, %(d)s,
  %(d)s::timestamptz + interval '4 s', %(d)s::timestamptz + interval '0.3 s', 3.0, NULL),
 (3, %(a)s, %(av)s, 1, 'k3', 'lead', '{"id": 3}', 'completed', %(d)s, %(d)s,
  %(d)s::timestamptz + interval '6 s', %(d)s::timestamptz + interval '0.5 s', 5.0, NULL),
 (4, %(a)s, %(av)s, 1, 'k4', 'lead', '{"id": 4}', 'failed', %(d)s, %(d)s,
  %(d)s::timestamptz + interval '8 s', NULL, 8.0, 'step create_task failed: boom'),
 (5, %(a)s, %(av)s, 1, 'k5', 'lead', '{"id": 5}', 'pending', %(d)s, NULL, NULL, NULL, NULL,
  NULL),
 (6, %(b)s, %(bv)s, 1, 'k6', 'deal', '{"id": 1}', 'completed', %(y)s, %(y)s,
  %(y)s::timestamptz + interval '1 s', %(y)s::timestamptz + interval '1 s', 1.0, NULL),
 (7, %(b)s, %(bv)s, 1, 'k7', 'deal', '{"id": 2}', 'failed', %(y)s, NULL, %(y)s, NULL, NULL,
  'loop stopped');
INSERT INTO crmflow.execution_steps (execution_id, step_id, position, type, status, attempts,
    started_at, finished_at, error)
SELECT x.id, 'create_task', 1, 'create_task',
       CASE WHEN x.id = 4 THEN 'failed' ELSE 'succeeded' END,
       CASE WHEN x.id = 4 THEN 3 ELSE 1 END,
       x.started_at, x.started_at + make_interval(secs => x.active_seconds),
       CASE WHEN x.id = 4 THEN 'boom' END
  FROM crmflow.executions AS x WHERE x.id <= 4;
INSERT INTO crmflow.outbox (entity_type, op, pk, captured_at, processed_at) VALUES
 ('lead', 'insert', '{"id": 1}', now() - interval '2 hours', now() - interval '2 hours'),
 ('lead', 'insert', '{"id": 9}', now() - interval '90 seconds', NULL);
INSERT INTO crmflow.workers (hostname, pid, started_at, last_heartbeat) VALUES
 ('h', 1, now() - interval '1 hour', now());
"""


@pytest.fixture
async def history(crm: psycopg.AsyncConnection[Any]) -> dict[str, int]:
    a = await apply(
        crm,
        {
            "name": "A",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "actions": [{"type": "create_task", "title": "t"}],
        },
    )
    b = await apply(
        crm,
        {
            "name": "B",
            "trigger": {"type": "entity_created", "entity_type": "deal"},
            "actions": [{"type": "create_task", "title": "t"}],
        },
    )
    versions = {
        r["workflow_id"]: r["id"]
        for r in await fetch(crm, "SELECT id, workflow_id FROM crmflow.workflow_versions")
    }
    params = {
        "a": a,
        "av": versions[a],
        "b": b,
        "bv": versions[b],
        "d": "2026-11-20 10:00+00",
        "y": "2026-11-19 23:00+00",
    }
    for statement in HISTORY.split(";\n"):
        if statement.strip():
            await crm.execute(statement, params if "%(" in statement else None)
    await crm.execute(
        "UPDATE crmflow.executions SET triggered_at = now() - interval '1 day' WHERE id <= 5"
    )  # in the SLA's 30-day window
    return {"a": a, "b": b}


async def test_execution_report(crm: psycopg.AsyncConnection[Any], history: dict[str, int]) -> None:
    await crm.execute(
        "UPDATE crmflow.executions SET triggered_at = '2026-11-20 10:00+00' WHERE id <= 5"
    )
    rows = await fetch(crm, "SELECT * FROM crmflow.execution_report ORDER BY workflow_name")
    a, b = rows
    assert (
        a["workflow_name"],
        str(a["day"]),
        a["executions"],
        a["completed"],
        a["failed"],
        a["in_progress"],
    ) == ("A", "2026-11-20", 5, 3, 1, 1)
    assert float(a["success_rate"]) == 0.75
    assert a["p50_first_action_s"] == pytest.approx(0.3)
    assert a["p95_first_action_s"] == pytest.approx(0.48)
    assert a["p50_duration_s"] == pytest.approx(5.0)
    assert a["avg_active_s"] == pytest.approx(17 / 4)
    assert (str(b["day"]), b["completed"], b["failed"], float(b["success_rate"])) == (
        "2026-11-19",
        1,
        1,
        0.5,
    )


async def test_sla_report_failures_outbox_lag_step_report(
    crm: psycopg.AsyncConnection[Any], history: dict[str, int]
) -> None:
    sla = {r["metric"]: r for r in await fetch(crm, "SELECT * FROM crmflow.sla_report")}
    assert set(sla) == {
        "execution_success_rate",
        "average_execution_time",
        "event_processing_latency_p95",
        "worker_uptime",
    }
    assert sla["execution_success_rate"]["value"] == pytest.approx(4 / 6)  # A and B
    assert sla["execution_success_rate"]["pass"] is False  # < 99.5%
    assert sla["average_execution_time"]["value"] == pytest.approx(18 / 5)
    assert sla["average_execution_time"]["pass"] is True  # < 5 s
    assert sla["event_processing_latency_p95"]["pass"] is True
    assert sla["worker_uptime"]["value"] == pytest.approx(1.0, abs=0.01)

    failures = await fetch(crm, "SELECT * FROM crmflow.failures ORDER BY execution_id")
    assert [(f["execution_id"], f["action"], f["attempts"], f["error"]) for f in failures] == [
        (4, "create_task", 3, "boom"),
        (7, None, 0, "loop stopped"),
    ]

    [lag] = await fetch(crm, "SELECT * FROM crmflow.outbox_lag")
    assert lag["backlog"] == 1 and 85 <= float(lag["oldest_age_s"]) < 300

    [steps] = await fetch(crm, "SELECT * FROM crmflow.step_report")
    assert (
        steps["action"],
        steps["steps"],
        steps["succeeded"],
        steps["failed"],
        steps["retries"],
        float(steps["success_rate"]),
    ) == ("create_task", 4, 3, 1, 2, 0.75)


async def test_metrics_endpoint(
    client: httpx.AsyncClient, crm: psycopg.AsyncConnection[Any], history: dict[str, int]
) -> None:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert samples[("crmflow_database_up", ())] == 1
    assert samples[("crmflow_executions", (("status", "completed"),))] == 4
    assert samples[("crmflow_dead_letters", ())] == 2
    assert samples[("crmflow_outbox_backlog", ())] == 1
    assert samples[("crmflow_outbox_oldest_age_seconds", ())] >= 85
    captured = await value(crm, "SELECT max(id) FROM crmflow.outbox")
    assert samples[("crmflow_events_captured_total", ())] == captured
    assert samples[("crmflow_step_duration_seconds_count", (("action", "create_task"),))] == 4
    assert (
        samples[
            ("crmflow_step_duration_seconds_bucket", (("action", "create_task"), ("le", "2.5")))
        ]
        == 1
    )  # the 1 s step
    assert samples[("crmflow_step_retries_total", (("action", "create_task"),))] == 2
    assert (
        "crmflow_worker_heartbeat_age_seconds",
        (("host", "h"), ("pid", "1"), ("worker", "1")),
    ) in samples
    anonymous = httpx.AsyncClient(transport=client._transport, base_url="http://testserver")
    assert (await anonymous.get("/metrics")).status_code == 401


async def test_alerts_go_through_a_workflow(
    crm: psycopg.AsyncConnection[Any], settings: Settings, matcher: Matcher, runner: Runner
) -> None:
    seed = REPO / "examples" / "workflows" / "05_alert_managers.json"
    await apply(crm, json.loads(seed.read_text()))
    failing = await apply(
        crm,
        {
            "name": "Flaky",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "actions": [{"type": "create_task", "title": "t"}],
        },
    )
    version = await value(
        crm, "SELECT id FROM crmflow.workflow_versions WHERE workflow_id = %s", failing
    )
    await crm.execute(
        "INSERT INTO crmflow.executions (workflow_id, workflow_version_id, workflow_version,"
        " enrollment_key, status, triggered_at, finished_at) SELECT %s, %s, 1, 'k' || i,"
        " CASE WHEN i <= 4 THEN 'failed' ELSE 'completed' END, now(), now()"
        " FROM generate_series(1, 10) i",
        [failing, version],
    )
    strict = settings.model_copy(update={"alert_failure_rate": 0.3, "alert_min_executions": 10})
    changes = await alerts.check(crm, strict)
    assert [(c.kind, c.subject, c.raised) for c in changes] == [("failure_rate", "Flaky", True)]
    assert await alerts.check(crm, strict) == []  # still open: not raised twice
    await matcher.drain()  # the alert row is an event like any other
    [delivery] = await fetch(
        crm,
        "SELECT x.id, crmflow.execution_lock(x.entity_type, x.entity_pk, x.id) AS lock"
        " FROM crmflow.executions x JOIN crmflow.workflows w ON w.id = x.workflow_id"
        " WHERE w.name LIKE 'Alert%%'",
    )
    assert await runner.run(delivery["id"], delivery["lock"]) == "completed"
    message = await value(crm, "SELECT message FROM notifications")
    assert message.startswith("crmflow alert: Workflow 'Flaky': 40% of 10 executions failed")

    await crm.execute(
        "UPDATE crmflow.executions SET status = 'completed' WHERE workflow_id = %s", [failing]
    )
    changes = await alerts.check(crm, strict)
    assert [(c.kind, c.raised) for c in changes] == [("failure_rate", False)]
    assert await value(crm, "SELECT count(*) FROM crmflow.alerts WHERE resolved_at IS NULL") == 0


async def test_the_worker_serves_metrics_on_its_own_port(db_url: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CRMFLOW_DATABASE_URL": db_url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "worker", "--metrics-port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        names = {f.name for f in text_string_to_metric_families(text)}
        assert {
            "crmflow_matcher_events",
            "crmflow_worker_steps",
            "crmflow_executions",
            "crmflow_outbox_backlog",
            "crmflow_worker_heartbeat_age_seconds",
        } <= names
    finally:
        proc.terminate()
        proc.wait(timeout=20)
