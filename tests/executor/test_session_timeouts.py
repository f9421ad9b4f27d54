"""No engine session can stop the others for long (docs/design.md, "The host comes
first"): statement, lock and idle-in-transaction timeouts on every engine connection, a
matcher that never waits for the ``crmflow.matcher_state`` row, workflow saves that
retry a lock timeout, and conflicts (deadlocks, lock timeouts) retried by the matcher
as such."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

from engine import db, metrics, workflows
from engine.config import Settings
from engine.matcher import Matcher, conflict_kind
from tests.helpers import apply, value

TASK = {
    "name": "Task per lead",
    "trigger": {"type": "entity_created", "entity_type": "lead"},
    "actions": [{"type": "create_task", "title": "Call {{ lead.name }}"}],
}


async def holder(db_url: str) -> psycopg.AsyncConnection[Any]:
    """Another session holding the matcher_state row in an open transaction, as a frozen
    matcher does mid-batch (a plain connection: no timeouts, it never lets go)."""
    conn = await psycopg.AsyncConnection.connect(db_url)
    await conn.execute("UPDATE crmflow.matcher_state SET listening = listening")
    return conn


async def test_every_engine_session_has_the_timeouts(
    db_url: str, settings: Settings, pool: Any
) -> None:
    names = ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")
    query = "SELECT " + ", ".join(f"current_setting('{n}') AS {n}" for n in names)
    async with pool.connection() as conn:
        pooled = await (await conn.execute(query)).fetchone()
    assert pooled == {
        "statement_timeout": "30s",
        "lock_timeout": "2s",
        "idle_in_transaction_session_timeout": "5s",
    }
    custom = Settings(database_url=db_url, lock_timeout=0.25, statement_timeout=0)
    async with await db.connect(db_url, custom, autocommit=True) as conn:
        direct = await (await conn.execute(query)).fetchone()
        info = conn.info.get_parameters()
    assert direct == {
        "statement_timeout": "0",
        "lock_timeout": "250ms",
        "idle_in_transaction_session_timeout": "5s",
    }
    assert info["connect_timeout"] == "5"


async def test_the_matcher_keeps_matching_while_another_session_holds_matcher_state(
    crm: psycopg.AsyncConnection[Any], db_url: str, matcher: Matcher
) -> None:
    await apply(crm, TASK)
    await crm.execute("UPDATE crmflow.matcher_state SET listening = true")
    frozen = await holder(db_url)
    try:
        await crm.execute(
            "INSERT INTO leads (name) SELECT 'lead ' || i FROM generate_series(1, 5) i"
        )
        started = time.monotonic()
        assert (await matcher.drain()).enrolled == 5
        await matcher._set_listening(True)  # does not wait either
        assert time.monotonic() - started < 1.0
    finally:
        await frozen.close()


async def test_a_save_waits_out_a_frozen_session_then_completes(
    crm: psycopg.AsyncConnection[Any], db_url: str
) -> None:
    """An engine session left idle in its transaction is ended by the server; a save
    waiting for its lock retries its lock timeouts until then."""
    frozen_settings = Settings(database_url=db_url, idle_in_transaction_timeout=3)
    frozen = await db.connect(db_url, frozen_settings)
    await frozen.execute("UPDATE crmflow.matcher_state SET listening = listening")
    started = time.monotonic()
    await apply(crm, TASK)  # lock_timeout 2 s per attempt
    took = time.monotonic() - started
    assert 2.0 < took < 8.0, took
    with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
        await frozen.execute("SELECT 1")  # the server ended it
    await frozen.close()
    assert await value(crm, "SELECT count(*) FROM crmflow.workflows") == 1


async def test_a_save_that_cannot_get_the_lock_says_so(
    crm: psycopg.AsyncConnection[Any], db_url: str
) -> None:
    quick = Settings(database_url=db_url, lock_timeout=0.1)
    frozen = await holder(db_url)
    try:
        async with await db.connect(db_url, quick, autocommit=True) as conn:
            started = time.monotonic()
            with pytest.raises(db.Busy, match="lock stayed taken by another session"):
                await workflows.apply(conn, {**TASK, "status": "active"})
            assert time.monotonic() - started < 5.0
            with pytest.raises(db.Busy):
                await workflows.set_status(conn, 1, "paused")
    finally:
        await frozen.close()
    assert await value(crm, "SELECT count(*) FROM crmflow.workflows") == 0


def test_conflict_kinds() -> None:
    assert conflict_kind(psycopg.errors.DeadlockDetected("x")) == "deadlock"
    assert conflict_kind(psycopg.errors.SerializationFailure("x")) == "serialization"
    assert conflict_kind(psycopg.errors.LockNotAvailable("x")) == "lock_timeout"
    assert conflict_kind(psycopg.errors.QueryCanceled("x")) == "statement_timeout"
    assert conflict_kind(psycopg.OperationalError("server closed the connection")) is None
    assert conflict_kind(psycopg.errors.AdminShutdown("x")) is None


async def test_the_matcher_retries_a_deadlock_at_once_and_counts_it(
    matcher: Matcher, db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    calls: list[float] = []
    real_drain = matcher.drain
    stop = asyncio.Event()

    async def drain() -> Any:
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise psycopg.errors.DeadlockDetected("deadlock detected")
        stop.set()
        return await real_drain()

    monkeypatch.setattr(matcher, "drain", drain)
    before = metrics.MATCHER_CONFLICTS.labels("deadlock")._value.get()
    await asyncio.wait_for(matcher.run(stop, db_url), 10)
    assert len(calls) == 3
    assert calls[2] - calls[0] < 0.5  # not the 1 s pause of a lost database, twice
    assert metrics.MATCHER_CONFLICTS.labels("deadlock")._value.get() == before + 2
    assert "rolled back by a deadlock" in caplog.text
    assert "lost the database" not in caplog.text


async def test_post_workflows_waits_out_a_frozen_session(
    crm: psycopg.AsyncConnection[Any], db_url: str, client: Any
) -> None:
    frozen = await db.connect(db_url, Settings(database_url=db_url, idle_in_transaction_timeout=3))
    await frozen.execute("UPDATE crmflow.matcher_state SET listening = listening")
    started = time.monotonic()
    response = await client.post("/workflows", json={**TASK, "status": "active"})
    assert response.status_code == 201, response.text
    assert time.monotonic() - started < 8.0
    await frozen.close()


async def test_post_workflows_answers_503_when_the_lock_stays_taken(
    crm: psycopg.AsyncConnection[Any], db_url: str, api_keys: dict[str, str]
) -> None:
    import httpx

    from api.main import create_app

    quick = Settings(database_url=db_url, lock_timeout=0.1)
    pool = db.create_pool(db_url, quick, min_size=1, max_size=2)
    await pool.open(wait=True)
    frozen = await holder(db_url)
    try:
        app = create_app(quick, pool=pool)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://testserver",
                headers={"Authorization": f"Bearer {api_keys['write']}"},
            ) as client,
        ):
            response = await client.post("/workflows", json={**TASK, "status": "active"})
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "5"
        assert "lock stayed taken" in response.json()["detail"]
    finally:
        await frozen.close()
        await pool.close()


def test_watch_behind_a_crm_transaction_gives_up_after_the_lock_timeout(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``crmflow watch`` adds triggers (DDL): behind a CRM transaction on the table it
    gives up after the lock timeout (it would otherwise queue every writer behind it)."""
    from engine.cli import main
    from engine.config import get_settings

    monkeypatch.setenv("CRMFLOW_DATABASE_URL", db_url)
    monkeypatch.setenv("CRMFLOW_LOCK_TIMEOUT", "0.2")
    get_settings.cache_clear()
    try:
        with psycopg.connect(db_url) as app:
            app.execute("UPDATE leads SET name = name")  # an open CRM transaction on leads
            assert main(["watch", "leads"]) == 1
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert "cannot capture public.leads: canceling statement due to lock timeout" in err
    assert "cannot reach the database" not in err


async def test_the_step_runner_retries_a_deadlock_soon(
    runner: Any, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    from datetime import UTC, datetime, timedelta

    from engine.runtime import StepRetryLater

    async def deadlocked(execution_id: int) -> str:
        raise psycopg.errors.DeadlockDetected("deadlock detected")

    monkeypatch.setattr(runner, "_run", deadlocked)
    with pytest.raises(StepRetryLater) as raised:
        await runner.run(1, None)
    assert raised.value.retry_at < datetime.now(UTC) + timedelta(seconds=0.6)
    assert "rolled back by a deadlock" in caplog.text
    assert "database unavailable" not in caplog.text
