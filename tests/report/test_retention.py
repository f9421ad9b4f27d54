"""Retention: ``crmflow prune`` deletes old processed events, finished executions
(with their steps) and finished jobs, in batches, and nothing else; a worker with
automatic retention keeps the outbox bounded under steady load."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import psycopg
import pytest

from engine import retention
from engine.cli import main
from engine.config import Settings, get_settings
from engine.matcher import Matcher
from engine.runtime import Runner
from engine.worker import running_worker
from tests.helpers import apply, drive, execution_ids, fetch, value

Conn = psycopg.AsyncConnection[Any]
DAY = 86400.0


async def ids(conn: Conn, query: str) -> list[int]:
    return [r["id"] for r in await fetch(conn, query)]


async def old_job(conn: Conn, status: str, days_ago: float) -> int:
    """A procrastinate job whose last event is ``days_ago`` days old."""
    job_id = await value(
        conn,
        "INSERT INTO procrastinate_jobs (queue_name, task_name, status)"
        " VALUES ('crmflow', 'test.retention', %s) RETURNING id",
        status,
    )
    await conn.execute(
        "INSERT INTO procrastinate_events (job_id, type, at)"
        " VALUES (%s, 'deferred', now() - make_interval(days => %s))",
        [job_id, days_ago],
    )
    return job_id  # type: ignore[no-any-return]


async def test_prune_deletes_only_what_it_should(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    await apply(
        crm,
        {
            "name": "Contact new leads",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "actions": [{"type": "update_field", "field": "status", "value": "contacted"}],
        },
    )
    await crm.execute(
        "INSERT INTO leads (name) SELECT 'Lead ' || i FROM generate_series(1, 6) AS i"
    )
    await matcher.drain()
    x1, x2, x3, x4, x5, x6 = await execution_ids(crm)
    for execution_id in (x1, x2, x3):
        assert (await drive(runner, crm, execution_id))["status"] == "completed"
    await crm.execute(
        "UPDATE crmflow.executions SET status = 'failed', finished_at = now(), error = 'boom'"
        " WHERE id = %s",
        [x4],
    )
    # Everything so far happened 40 days ago.
    await crm.execute(
        "UPDATE crmflow.outbox SET captured_at = captured_at - interval '40 days',"
        " processed_at = processed_at - interval '40 days' WHERE processed_at IS NOT NULL"
    )
    await crm.execute(
        "UPDATE crmflow.executions SET triggered_at = triggered_at - interval '40 days',"
        " finished_at = finished_at - interval '40 days' WHERE finished_at IS NOT NULL"
    )
    assert (await drive(runner, crm, x5))["status"] == "completed"  # finished just now
    await crm.execute("DELETE FROM crmflow.outbox WHERE depth > 0")  # its write's event
    await crm.execute("INSERT INTO leads (name) VALUES ('Unmatched 1'), ('Unmatched 2')")
    old_failed_job = await old_job(crm, "failed", 40)
    recent_failed_job = await old_job(crm, "failed", 1)
    old_todo_job = await old_job(crm, "todo", 40)

    [e1, e2, e3, e4, e5, e6] = await ids(
        crm, "SELECT event_id AS id FROM crmflow.executions ORDER BY id"
    )
    unprocessed = await ids(crm, "SELECT id FROM crmflow.outbox WHERE processed_at IS NULL")
    assert len(unprocessed) == 2
    doomed_steps = await value(
        crm,
        "SELECT count(*) FROM crmflow.execution_steps WHERE execution_id = ANY(%s)",
        [x1, x2, x3, x4],
    )
    assert doomed_steps == 3  # the failed one (set by hand) ran no step

    ages = {"outbox_older_than": 30 * DAY, "history_older_than": 30 * DAY}
    dry = await retention.count_prunable(crm, **ages)
    assert (dry.outbox, dry.executions, dry.steps, dry.jobs) == (4, 4, doomed_steps, 1)
    seen: list[tuple[str, int]] = []
    counts = await retention.prune(
        crm, **ages, batch_size=1, progress=lambda what, n: seen.append((what, n))
    )
    assert (counts.outbox, counts.executions, counts.steps, counts.jobs) == (
        4,
        4,
        doomed_steps,
        1,
    )
    assert counts.batches == 4 + 1 + 4 + 1 + 1 + 1  # one row each, then an empty batch each
    assert ("outbox", 4) in seen and ("executions", 4) in seen and ("jobs", 1) in seen

    # Kept: the failed execution's event (a retry reads it), the pending one's, the
    # unprocessed ones; the recent and the live executions; the recent and unfinished jobs.
    assert await ids(crm, "SELECT id FROM crmflow.outbox ORDER BY id") == sorted(
        [e4, e6, *unprocessed]
    )
    assert await ids(crm, "SELECT id FROM crmflow.executions ORDER BY id") == [x5, x6]
    assert (
        await value(
            crm,
            "SELECT count(*) FROM crmflow.execution_steps WHERE execution_id = ANY(%s)",
            [x1, x4],
        )
        == 0
    )
    jobs = await ids(crm, "SELECT id FROM procrastinate_jobs WHERE task_name = 'test.retention'")
    assert sorted(jobs) == sorted([recent_failed_job, old_todo_job])
    assert old_failed_job not in jobs
    assert e1 and e2 and e3 and e5

    # The reporting views still answer over what is left.
    for view in ("execution_report", "sla_report", "failures", "outbox_lag", "step_report"):
        await fetch(crm, f"SELECT * FROM crmflow.{view}")
    # A second run: the failed execution is gone now, so its event goes too; then nothing.
    again = await retention.prune(crm, **ages)
    assert (again.outbox, again.executions, again.jobs) == (1, 0, 0)
    assert await ids(crm, "SELECT id FROM crmflow.outbox ORDER BY id") == sorted([e6, *unprocessed])
    assert (await retention.prune(crm, **ages)).total == 0


@pytest.fixture
def cli_db(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("CRMFLOW_DATABASE_URL", db_url)
    get_settings.cache_clear()
    yield db_url
    get_settings.cache_clear()


def test_crmflow_prune_command(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    with psycopg.connect(cli_db, autocommit=True) as c:
        c.execute(
            "INSERT INTO crmflow.outbox (entity_type, op, pk, captured_at, processed_at)"
            " SELECT 'lead', 'insert', jsonb_build_object('id', i), t, t"
            " FROM generate_series(1, 48) AS i,"
            " LATERAL (SELECT now() - make_interval(hours => i) AS t) AS at"
        )
        c.execute(
            "INSERT INTO crmflow.outbox (entity_type, op, pk)"
            " SELECT 'lead', 'insert', jsonb_build_object('id', i)"
            " FROM generate_series(100, 104) AS i"
        )
    capsys.readouterr()
    assert main(["prune", "--older-than", "12h", "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert (
        dry["dry_run"] is True and dry["outbox_events"] == 37
    )  # 12 h (by now a bit more) to 48 h old
    assert main(["prune", "--older-than", "12h", "--batch-size", "10"]) == 0
    out = capsys.readouterr().out
    assert (
        "deleted 37 outbox events, 0 executions (0 steps) and 0 finished jobs older than 12h"
        in (" ".join(out.split()))
    )
    with psycopg.connect(cli_db, autocommit=True) as c:
        left = c.execute(
            "SELECT count(*) FILTER (WHERE processed_at IS NULL),"
            " count(*) FILTER (WHERE processed_at IS NOT NULL) FROM crmflow.outbox"
        ).fetchone()
    assert left == (5, 11)
    assert main(["prune", "--older-than", "1d", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outbox_events"] == 0
    with pytest.raises(SystemExit):
        main(["prune", "--older-than", "soon"])
    assert main(["prune", "--older-than", "1d", "--batch-size", "0"]) == 1


async def test_outbox_stays_bounded_under_steady_load(
    crm: Conn, db_url: str, settings: Settings
) -> None:
    """Writes at a steady rate for a few seconds, a worker with 1 s retention: the
    outbox never holds more than a couple of seconds of events."""
    retaining = Settings.model_validate(
        {
            **settings.model_dump(),
            "retention_outbox": 1,
            "retention_history": 1,
            "retention_interval": 0.2,
            "retention_batch_size": 500,
        }
    )
    written, samples = 0, []
    duration, rows_per_tick, tick = 5.0, 40, 0.04
    async with running_worker(db_url, settings=retaining, concurrency=2):
        started = time.monotonic()
        while time.monotonic() - started < duration:
            await crm.execute(
                "INSERT INTO leads (name) SELECT 'Load ' || i FROM generate_series(1, %s) AS i",
                [rows_per_tick],
            )
            written += rows_per_tick
            samples.append(await value(crm, "SELECT count(*) FROM crmflow.outbox"))
            await asyncio.sleep(tick)

        async def drained() -> bool:
            return await value(crm, "SELECT count(*) FROM crmflow.outbox") == 0

        deadline = time.monotonic() + 10
        while not await drained():
            assert time.monotonic() < deadline, "the outbox was not pruned after the load"
            await asyncio.sleep(0.1)
    peak = max(samples)
    print(f"steady load: {written} events written in {duration:g}s, outbox peak {peak} rows")
    assert written >= 2000
    assert peak < written / 3, (peak, written)
    assert await value(crm, "SELECT max(id) FROM leads") >= written
