"""`crmflow relation ...` and `crmflow score ...` end to end, and the daily batch: a due
schedule scores the whole table once and moves to its next time."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine import db
from engine.cli import main
from engine.config import get_settings

SCHEMA = """
CREATE TABLE cli_accounts (id bigint PRIMARY KEY, csm_id bigint, risk text,
                           score double precision);
CREATE TABLE cli_logins (id bigserial PRIMARY KEY, account_id bigint,
                         at timestamptz NOT NULL DEFAULT now());
INSERT INTO cli_accounts (id, csm_id) VALUES (1, NULL), (2, 5), (3, NULL);
INSERT INTO cli_logins (account_id) VALUES (2), (2), (3);
"""

CARD = {
    "name": "cli_risk",
    "entity_type": "cli_account",
    "model": "points",
    "factors": [
        {"id": "no_csm", "weight": 10, "condition": [{"field": "csm_id", "operator": "is_empty"}]},
        {"id": "logins", "weight": -4, "aggregate": {"relation": "logins", "window": "7d"}},
    ],
    "bands": {"ok": -100, "watch": 5},
    "write": {"score": "score", "level": "risk"},
    "schedule": "0 3 * * *",
}


def _sql(url: str, query: str) -> Any:
    async def go() -> Any:
        async with await db.connect(url, autocommit=True) as conn:
            cur = await conn.execute(query)
            return await cur.fetchall() if cur.description else None

    return asyncio.run(go())


@pytest.fixture
def cli_db(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("CRMFLOW_DATABASE_URL", db_url)
    get_settings.cache_clear()
    _sql(db_url, SCHEMA)
    yield db_url
    get_settings.cache_clear()


def test_score_commands(cli_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["watch", "cli_accounts", "--entity", "cli_account"]) == 0
    assert (
        main(
            [
                "relation",
                "add",
                "cli_logins",
                "--entity",
                "cli_account",
                "--key",
                "account_id",
                "--time-column",
                "at",
                "--name",
                "logins",
            ]
        )
        == 0
    )
    assert main(["relation", "add", "cli_logins", "--entity", "cli_account", "--key", "x"]) == 1
    assert "no column 'x'" in capsys.readouterr().err
    path = tmp_path / "risk.yaml"
    path.write_text(yaml.safe_dump(CARD))
    assert main(["score", "apply", str(path)]) == 0
    assert "scorecard cli_risk v1 created" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**CARD, "bands": {"ok": 1, "watch": 0}}))
    assert main(["score", "apply", str(bad)]) == 1
    assert "bands.watch: bounds must increase" in capsys.readouterr().err
    assert main(["score", "run", "cli_risk", "--key", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scored"] == 1
    assert main(["score", "run", "cli_risk"]) == 0
    assert "scored 3" in capsys.readouterr().out
    rows = _sql(cli_db, "SELECT id, score, risk FROM cli_accounts ORDER BY id")
    assert [(r["id"], r["score"], r["risk"]) for r in rows] == [
        (1, 10.0, "watch"),
        (2, -8.0, "ok"),
        (3, 6.0, "watch"),
    ]
    assert main(["score", "list", "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert listed["levels"] == {"ok": 1, "watch": 2} and listed["schedule"] == "0 3 * * *"
    assert main(["score", "show", "cli_risk", "--sql"]) == 0
    shown = capsys.readouterr().out
    assert "cli_risk" in shown and "crmflow.score_history" in shown
    assert main(["score", "show", "nope"]) == 1
    assert main(["relation", "list", "--json"]) == 0
    [rel] = json.loads(capsys.readouterr().out)
    assert (rel["name"], rel["key_column"], rel["time_column"]) == ("logins", "account_id", "at")


def test_a_due_schedule_runs_the_whole_table_once(cli_db: str) -> None:
    from engine.scorecards import relations, run, store

    async def go() -> None:
        async with await db.connect(cli_db, autocommit=True) as conn:
            from engine import capture

            await capture.watch(conn, "cli_accounts", entity="cli_account")
            await relations.add_relation(
                conn, "cli_logins", "cli_account", "account_id", "at", name="logins"
            )
            await store.apply(conn, CARD)
            row = await (
                await conn.execute("SELECT next_run_at FROM crmflow.scorecards")
            ).fetchone()
            assert row is not None and row["next_run_at"] > datetime.now(UTC)
            assert row["next_run_at"].hour == 3
            assert await run.run_due(conn) == []  # not due yet
            await conn.execute(
                "UPDATE crmflow.scorecards SET next_run_at = now() - interval '1 minute'"
            )
            [result] = await run.run_due(conn)
            assert (result.scored, result.updated) == (3, 3)
            assert await run.run_due(conn) == []  # moved to tomorrow 03:00
            after = await (
                await conn.execute("SELECT next_run_at, last_run_at FROM crmflow.scorecards")
            ).fetchone()
            assert after is not None and after["next_run_at"] > datetime.now(UTC)
            assert after["last_run_at"] is not None
            # Paused: not run even when due.
            await store.apply(conn, {**CARD, "status": "paused"})
            await conn.execute(
                "UPDATE crmflow.scorecards SET next_run_at = now() - interval '1 minute'"
            )
            assert await run.run_due(conn) == []

    asyncio.run(go())


def test_a_scheduled_run_whose_worker_was_killed_runs_again(cli_db: str) -> None:
    """The due run is claimed for SCHEDULE_CLAIM_SECONDS, not moved to its next time
    before it ran: a worker killed during it leaves it due again once the claim is over
    (before, the run was skipped until its next time, a day or a year later)."""
    import subprocess
    import sys
    import time

    from engine.scorecards import relations, run, store
    from tests.paths import REPO
    from tests.scorecards import worker_script

    async def setup() -> None:
        async with await db.connect(cli_db, autocommit=True) as conn:
            from engine import capture

            await capture.watch(conn, "cli_accounts", entity="cli_account")
            await relations.add_relation(
                conn, "cli_logins", "cli_account", "account_id", "at", name="logins"
            )
            await store.apply(conn, {**CARD, "schedule": "0 0 1 1 *"})  # yearly
            await conn.execute(
                "UPDATE crmflow.scorecards SET next_run_at = now() - interval '1 minute'"
            )

    async def scalar(query: str) -> Any:
        async with await db.connect(cli_db, autocommit=True) as conn:
            row = await (await conn.execute(query)).fetchone()
            assert row is not None
            return next(iter(row.values()))

    asyncio.run(setup())
    import psycopg

    with psycopg.connect(cli_db) as blocker:
        blocker.execute("LOCK TABLE crmflow.score_latest IN EXCLUSIVE MODE")
        worker = subprocess.Popen(
            [sys.executable, "-c", worker_script.SCRIPT, cli_db, "run_due"],
            cwd=REPO,
            stdout=subprocess.PIPE,
        )
        assert worker.stdout is not None
        pid = int(worker.stdout.readline())
        deadline = time.monotonic() + 20
        while (
            asyncio.run(scalar(f"SELECT wait_event_type FROM pg_stat_activity WHERE pid = {pid}"))
            != "Lock"
        ):
            assert time.monotonic() < deadline, "the scheduled run never reached its lock"
            time.sleep(0.05)
        worker.kill()
        worker.wait()
        blocker.rollback()
    while asyncio.run(scalar(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}")):
        time.sleep(0.05)
    # Claimed, not moved to next year: due again within the claim.
    left = asyncio.run(
        scalar("SELECT extract(epoch FROM next_run_at - now()) FROM crmflow.scorecards")
    )
    assert 0 < left <= run.SCHEDULE_CLAIM_SECONDS + 5
    assert asyncio.run(scalar("SELECT count(*) FROM crmflow.score_latest")) == 0

    async def claim_over_and_due() -> list[Any]:
        async with await db.connect(cli_db, autocommit=True) as conn:
            assert await run.run_due(conn) == []  # still claimed
            await conn.execute(
                "UPDATE crmflow.scorecards SET next_run_at = now() - interval '1 second'"
            )
            return await run.run_due(conn)

    [result] = asyncio.run(claim_over_and_due())
    assert result.scored == 3
    # Ran: moved to its next time (next year).
    left = asyncio.run(
        scalar("SELECT extract(epoch FROM next_run_at - now()) FROM crmflow.scorecards")
    )
    assert left > 86400
