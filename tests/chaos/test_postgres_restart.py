"""Scenario 2: PostgreSQL restarts under a running worker and API. They must survive
(no exit, no crash loop), the API must say 503 while the database is away and 200 after,
and every event written before and after must be processed exactly once.

The server restarted is a private cluster made for this test: the machine's PostgreSQL
is shared with other test runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine import apikeys, db
from engine.config import Settings
from engine.migrations import migrate
from engine.seed import install_example_crm
from tests.chaos.helpers import (
    Figures,
    PrivateCluster,
    Process,
    free_port,
    report,
    start_api,
    start_worker,
)
from tests.chaos.test_worker_kill import DUPLICATES
from tests.conftest import with_dbname
from tests.helpers import apply, fetch, install_test_crm, value

pytestmark = pytest.mark.chaos

PER_BATCH = 20
DOWN_SECONDS = 3.0


@pytest.fixture
def cluster() -> Iterator[PrivateCluster]:
    c = PrivateCluster()
    try:
        c.init()
        c.start()
        yield c
    finally:
        c.destroy()


async def query(url: str, sql: str, *args: Any) -> Any:
    async with await db.connect(url, autocommit=True) as conn:
        return await value(conn, sql, *args)


async def execute(url: str, sql: str, *args: Any) -> None:
    async with await db.connect(url, autocommit=True) as conn:
        await conn.execute(sql, args or None)


async def unfinished_detail(url: str) -> list[dict[str, Any]]:
    """The executions left unfinished, with their steps and jobs (for a failure message)."""
    async with await db.connect(url, autocommit=True) as conn:
        return await fetch(
            conn,
            "SELECT x.id, x.status, x.error, x.not_before,"
            " (SELECT json_agg(json_build_object('step', s.step_id, 'status', s.status,"
            "   'attempts', s.attempts, 'error', s.error, 'at', s.scheduled_at))"
            "  FROM crmflow.execution_steps s WHERE s.execution_id = x.id) AS steps,"
            " (SELECT json_agg(json_build_object('job', j.id, 'status', j.status,"
            "   'lock', j.lock, 'at', j.scheduled_at, 'attempts', j.attempts))"
            "  FROM procrastinate.procrastinate_jobs j"
            "  WHERE (j.args ->> 'execution_id')::bigint = x.id) AS jobs"
            " FROM crmflow.executions x WHERE x.status <> 'completed'",
        )


async def test_postgres_restart_under_worker_and_api(
    cluster: PrivateCluster, procs: list[Process], log_dir: Path
) -> None:
    url = with_dbname(cluster.url, "crm")
    async with await db.connect(cluster.url, autocommit=True) as admin:
        await admin.execute("CREATE DATABASE crm")
    async with await db.connect(url, autocommit=True) as conn:
        await migrate(conn)
        await install_example_crm(conn, Settings(database_url=url))
        await install_test_crm(conn)
        await apply(
            conn,
            {
                "name": "Survives a restart",
                "trigger": {"type": "entity_created", "entity_type": "lead"},
                "actions": [
                    {"type": "create_task", "title": "first {{ lead.name }}"},
                    {"type": "test_sleep", "seconds": 0.3, "label": "{{ lead.name }}"},
                    {"type": "create_task", "title": "second {{ lead.name }}", "delay": 1},
                ],
            },
        )
        _, key = await apikeys.create(conn, "chaos", "read")

    worker = start_worker(url, log_dir)
    port = free_port()
    api = start_api(url, log_dir, port)
    procs += [worker, api]
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {key}"}

    async with httpx.AsyncClient(base_url=base, headers=auth, timeout=10) as http:

        async def status(path: str) -> int | str:
            try:
                return (await http.get(path)).status_code
            except httpx.TransportError as exc:
                return type(exc).__name__

        for _ in range(150):
            if await status("/workflows") == 200:
                break
            await asyncio.sleep(0.1)
        assert await status("/workflows") == 200, api.log()

        await execute(
            url,
            "INSERT INTO leads (name) SELECT 'before ' || i FROM generate_series(1, %s) i",
            PER_BATCH,
        )
        for _ in range(200):
            if await query(url, "SELECT count(*) FROM test_trace") >= 3:
                break
            await asyncio.sleep(0.05)
        in_flight = await query(
            url, "SELECT count(*) FROM crmflow.executions WHERE status <> 'completed'"
        )

        cluster.stop()
        down_at = time.monotonic()
        down_answers: set[int | str] = set()
        health_down: int | str | None = None
        while time.monotonic() - down_at < DOWN_SECONDS:
            down_answers.add(await status("/workflows"))
            health_down = await status("/health")
            await asyncio.sleep(0.2)
        cluster.start()
        up_at = time.monotonic()
        assert worker.alive(), worker.log()
        assert api.alive(), api.log()

        api_back = None
        while time.monotonic() - up_at < 30:
            if await status("/workflows") == 200:
                api_back = time.monotonic() - up_at
                break
            await asyncio.sleep(0.1)
        health_up = await status("/health")

        await execute(
            url,
            "INSERT INTO leads (name) SELECT 'after ' || i FROM generate_series(1, %s) i",
            PER_BATCH,
        )
        recovered = None
        while time.monotonic() - up_at < 90:
            done = await query(
                url, "SELECT count(*) FROM crmflow.executions WHERE status = 'completed'"
            )
            if done == 2 * PER_BATCH:
                recovered = time.monotonic() - up_at
                break
            await asyncio.sleep(0.1)

    worker_alive, api_alive = worker.alive(), api.alive()
    unfinished = await unfinished_detail(url)
    events = await query(url, "SELECT count(*) FROM crmflow.outbox")
    completed = await query(
        url, "SELECT count(*) FROM crmflow.executions WHERE status = 'completed'"
    )
    lost = await query(
        url,
        "SELECT count(*) FROM leads l WHERE NOT EXISTS (SELECT 1 FROM crmflow.executions x"
        " WHERE x.entity_pk = jsonb_build_object('id', l.id) AND x.status = 'completed')",
    )
    duplicated = await query(url, DUPLICATES)
    tasks = await query(url, "SELECT count(*) FROM tasks")
    restarts = worker.log().count("restarting it in")
    report(
        Figures(
            "postgres-restart",
            events_captured=events,
            executions_completed=completed,
            duplicated_effects=duplicated,
            lost_events=lost,
            time_to_recover_s=recovered,
            extra={
                "in_flight_at_stop": in_flight,
                "api_back_s": None if api_back is None else round(api_back, 2),
                "api_down_answers": sorted(map(str, down_answers)),
                "job_worker_restarts": restarts,
            },
        ),
        [worker],
    )
    assert worker_alive and api_alive, "a process died with the database"
    assert down_answers == {503}, f"the API answered {down_answers} while the database was down"
    assert health_down == 503 and health_up == 200
    assert api_back is not None and api_back < 10
    assert recovered is not None, f"unfinished: {unfinished}\n{worker.log()}"
    assert events == 2 * PER_BATCH and completed == 2 * PER_BATCH
    assert lost == 0 and duplicated == 0 and tasks == 4 * PER_BATCH
    assert restarts <= 6, f"the job worker restarted {restarts} times: a crash loop"
