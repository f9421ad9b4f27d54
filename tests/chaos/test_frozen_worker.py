"""A frozen worker (SIGSTOP mid-batch, a paused VM) beside a live one: the live worker
keeps matching new writes, and a workflow save completes within seconds. The frozen
worker's open transaction is ended by the server (idle_in_transaction_session_timeout)
and, once thawed (SIGCONT), it reconnects and goes on; nothing is lost or doubled."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from engine import db, workflows
from tests.chaos.helpers import Figures, Process, report, start_worker
from tests.helpers import apply, value, wait_until

pytestmark = pytest.mark.chaos

FREEZE = 15.0  # seconds the worker stays frozen
BURST = 300  # leads per burst while looking for the frozen worker's open transaction

TASK = {
    "name": "Task per new lead",
    "trigger": {"type": "entity_created", "entity_type": "lead"},
    "actions": [{"type": "create_task", "title": "call {{ lead.name }}"}],
}
DUPLICATES = """
SELECT coalesce(sum(n - 1), 0) FROM (
    SELECT count(*) AS n FROM tasks GROUP BY title
    UNION ALL SELECT count(*) FROM crmflow.executions GROUP BY event_id, workflow_id
) AS effects
"""


def named(url: str, name: str) -> str:
    params = conninfo_to_dict(url)
    params["application_name"] = name
    return make_conninfo("", **params)


async def in_transaction(conn: psycopg.AsyncConnection[Any], name: str) -> bool:
    """Whether a session of that worker is inside a transaction (not LISTEN)."""
    return bool(
        await value(
            conn,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            " AND xact_start IS NOT NULL AND pid <> pg_backend_pid()",
            name,
        )
    )


async def matcher_state_held_by(url: str, admin: psycopg.AsyncConnection[Any]) -> str | None:
    """The application name of the session holding the matcher_state row, if any: a
    probe waits for the row (at most 1 s) while ``admin`` asks who blocks it."""
    async with await psycopg.AsyncConnection.connect(url) as probe:
        pid = probe.info.backend_pid
        await probe.execute("SET lock_timeout = '1s'")
        waiting = asyncio.create_task(
            probe.execute("SELECT 1 FROM crmflow.matcher_state FOR UPDATE")
        )
        await asyncio.sleep(0.3)
        holder = await value(
            admin,
            "SELECT string_agg(application_name, ',') FROM pg_stat_activity"
            " WHERE pid = ANY(pg_blocking_pids(%s))",
            pid,
        )
        with contextlib.suppress(psycopg.errors.LockNotAvailable):
            await waiting
        await probe.rollback()
        return holder


async def test_a_frozen_worker_beside_a_live_one(
    crm: psycopg.AsyncConnection[Any], db_url: str, procs: list[Process], log_dir: Path
) -> None:
    await apply(crm, TASK)
    frozen = start_worker(named(db_url, "crmflow-frozen"), log_dir, "frozen")
    live = start_worker(named(db_url, "crmflow-live"), log_dir, "live")
    procs += [frozen, live]

    async def both_registered() -> bool:
        return await value(crm, "SELECT count(*) FROM crmflow.workers") == 2

    await wait_until(both_registered, timeout=60)
    written = 0

    async def burst() -> None:
        nonlocal written
        await crm.execute(
            "INSERT INTO leads (name) SELECT 'lead ' || (%s + i) FROM generate_series(1, %s) i",
            [written, BURST],
        )
        written += BURST

    # Freeze the worker inside a transaction, holding the matcher_state row if we can
    # (a matcher takes it when it flips "listening" off at the start of a burst).
    held = False
    tries = 0
    for tries in range(1, 41):
        await asyncio.sleep(0.6)  # both matchers idle: "listening" is on
        await burst()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not await in_transaction(crm, "crmflow-frozen"):
            await asyncio.sleep(0.002)
        frozen.popen.send_signal(signal.SIGSTOP)
        await asyncio.sleep(0.05)
        if await in_transaction(crm, "crmflow-frozen"):
            held = await matcher_state_held_by(db_url, crm) == "crmflow-frozen"
            if held or tries >= 30:
                break
        frozen.popen.send_signal(signal.SIGCONT)
    frozen_at = time.monotonic()

    # While it is frozen: a lead every 0.1 s, and a workflow save a second in.
    marks: list[tuple[str, float]] = []

    async def save() -> float:
        await asyncio.sleep(1.0)
        started = time.monotonic()
        async with await db.connect(db_url, autocommit=True) as conn:
            await workflows.apply(
                conn, {**TASK, "name": "Saved during the freeze", "status": "paused"}
            )
        return time.monotonic() - started

    saving = asyncio.create_task(save())
    async with await db.connect(db_url, autocommit=True) as writer:
        n = 0
        while time.monotonic() - frozen_at < FREEZE:
            n += 1
            name = f"during freeze {n}"
            await writer.execute("INSERT INTO leads (name) VALUES (%s)", [name])
            marks.append((name, time.monotonic()))
            await asyncio.sleep(0.1)
    frozen.popen.send_signal(signal.SIGCONT)  # (a save that waited unbounded ends now)
    save_s = await asyncio.wait_for(saving, 60)

    delays = []
    for name, _ in marks:

        async def matched(name: str = name) -> bool:
            return bool(
                await value(
                    crm,
                    "SELECT count(*) FROM crmflow.executions x JOIN leads l"
                    " ON x.entity_pk = jsonb_build_object('id', l.id) WHERE l.name = %s",
                    name,
                )
            )

        # When it was matched: the execution's creation against the lead's commit.
        await wait_until(matched, timeout=60)
        delay = await value(
            crm,
            "SELECT extract(epoch FROM x.created_at - l.created_at) FROM crmflow.executions x"
            " JOIN leads l ON x.entity_pk = jsonb_build_object('id', l.id) WHERE l.name = %s",
            name,
        )
        delays.append(float(delay))
    total = written + len(marks)

    async def all_completed() -> bool:
        n = await value(crm, "SELECT count(*) FROM crmflow.executions WHERE status = 'completed'")
        return n >= total

    await wait_until(all_completed, timeout=120, interval=0.25)
    lost = await value(
        crm,
        "SELECT count(*) FROM crmflow.outbox o WHERE o.entity_type = 'lead' AND o.op = 'insert'"
        " AND NOT EXISTS (SELECT 1 FROM crmflow.executions x WHERE x.event_id = o.id)",
    )
    duplicated = await value(crm, DUPLICATES)
    report(
        Figures(
            "frozen-worker",
            events_captured=total,
            executions_completed=await value(
                crm, "SELECT count(*) FROM crmflow.executions WHERE status = 'completed'"
            ),
            duplicated_effects=duplicated,
            lost_events=lost,
            extra={
                "froze_holding_matcher_state": held,
                "tries": tries,
                "frozen_s": FREEZE,
                "live_delay_max_s": round(max(delays), 2),
                "live_delay_p50_s": round(statistics.median(delays), 3),
                "save_s": round(save_s, 2),
            },
        ),
        [frozen, live],
    )
    assert lost == 0 and duplicated == 0
    assert save_s < 8.0  # lock_timeout retries until the server ends the frozen session (5 s)
    assert max(delays) < 12.0
    assert frozen.alive() and live.alive()
