"""The churn scenario's generated history (engine/churn_history.py): reproducible from its
seed, inserted with COPY into the example CRM, and with risk signals that actually
precede churn (what the scorecard and `score fit` rely on)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date
from typing import Any

import numpy as np
import psycopg

from engine import churn_history
from engine.churn_history import DAY, NEW_DAYS, simulate

END = date(2026, 6, 30)

CHECKSUM = """
SELECT (SELECT md5(string_agg(concat_ws('|', id, name, created_at, churned_at, arr), ','
                              ORDER BY id)) FROM accounts) AS accounts,
       (SELECT md5(string_agg(concat_ws('|', account_id, occurred_at), ','
                              ORDER BY account_id, occurred_at)) FROM logins) AS logins,
       (SELECT md5(string_agg(concat_ws('|', account_id, due_date, paid_at, days_late), ','
                              ORDER BY account_id, due_date, paid_at)) FROM invoices) AS invoices,
       (SELECT md5(string_agg(concat_ws('|', account_id, key_contact, left_at), ','
                              ORDER BY id)) FROM contacts) AS contacts
"""


def test_the_same_seed_gives_the_same_history_and_another_seed_another() -> None:
    a = simulate(300, seed=5, end=END)
    b = simulate(300, seed=5, end=END)
    c = simulate(300, seed=6, end=END)
    assert a.counts() == b.counts()
    for table in a.tables:
        for column in a.tables[table]:
            assert np.array_equal(a.tables[table][column], b.tables[table][column]), (table, column)
    assert np.array_equal(a.accounts["churned"], b.accounts["churned"])
    assert a.accounts["name"] == b.accounts["name"]
    assert not np.array_equal(a.accounts["churned"], c.accounts["churned"])


def test_signals_precede_churn_and_new_customers_behave_differently() -> None:
    h = simulate(1500, seed=17, end=END)
    acc = h.accounts
    churned = acc["churned"] >= 0
    assert 0.15 < churned.mean() < 0.6, churned.mean()
    # Logins in the 30 days before churn against 30 days of a live account, both at least
    # 120 days into their life: churners log in less.
    logins = h.tables["logins"]
    mature = (acc["churned"] - acc["created"] > 120 * DAY) & churned
    per_churner = [
        np.sum(
            (logins["account"] == i)
            & (logins["at"] > acc["churned"][i] - 30 * DAY)
            & (logins["at"] <= acc["churned"][i])
        )
        for i in np.flatnonzero(mature)[:200]
    ]
    live = ~churned & (h.end - acc["created"] > 120 * DAY)
    per_live = [
        np.sum((logins["account"] == i) & (logins["at"] > h.end - 30 * DAY))
        for i in np.flatnonzero(live)[:200]
    ]
    assert np.mean(per_churner) < 0.75 * np.mean(per_live), (
        np.mean(per_churner),
        np.mean(per_live),
    )
    # Late invoices are more common among accounts that churn.
    inv = h.tables["invoices"]
    late = (inv["paid"] >= 0) & ((inv["paid"] // DAY) - inv["due"] >= 8)
    rate_churned = late[churned[inv["account"]]].mean()
    rate_live = late[~churned[inv["account"]]].mean()
    assert rate_churned > 1.3 * rate_live, (rate_churned, rate_live)
    # New customers open onboarding tickets whatever their outcome and answer no NPS.
    tickets = h.tables["support_tickets"]
    age = (tickets["at"] - acc["created"][tickets["account"]]) / DAY
    weeks_new = np.sum(
        np.clip(
            np.minimum(h.end, acc["created"] + NEW_DAYS * DAY)
            - np.maximum(acc["created"], h.start),
            0,
            None,
        )
    ) / (7 * DAY)
    weeks_old = np.sum(
        np.clip(
            np.where(churned, acc["churned"], h.end)
            - np.maximum(acc["created"] + NEW_DAYS * DAY, h.start),
            0,
            None,
        )
    ) / (7 * DAY)
    new_rate = np.sum(age < NEW_DAYS) / weeks_new
    old_rate = np.sum(age >= NEW_DAYS) / weeks_old
    assert new_rate > 2 * old_rate, (new_rate, old_rate)
    nps = h.tables["nps_responses"]
    assert np.all(nps["at"] - acc["created"][nps["account"]] >= NEW_DAYS * DAY)
    # Key contacts leave, mostly from accounts that go on to churn.
    left = h.contacts["left"] >= 0
    assert left.any() and np.all(h.contacts["key"][left])


async def _generate(url: str) -> dict[str, Any]:
    from engine import db
    from engine.config import Settings
    from engine.seed import install_example_crm

    async with await db.connect(url, autocommit=True) as conn:
        await install_example_crm(conn, Settings(database_url=url))
        done = await churn_history.generate(conn, 400, seed=3, end=END)
        assert done.counts["accounts"] == 400
        assert done.counts["logins"] > 10_000
        row = await (await conn.execute(CHECKSUM)).fetchone()
        counts = await (
            await conn.execute(
                "SELECT (SELECT count(*) FROM logins) AS logins,"
                " (SELECT count(*) FROM accounts WHERE churned_at IS NOT NULL) AS churned,"
                " (SELECT count(*) FROM crmflow.outbox) AS outbox"
            )
        ).fetchone()
        assert row is not None and counts is not None
        assert counts["logins"] == done.counts["logins"]
        return {**row, **counts}


async def test_generate_twice_gives_identical_tables(db_url: str, empty_db: str) -> None:
    from engine import db
    from engine.migrations import migrate

    async with await db.connect(empty_db, autocommit=True) as conn:
        await migrate(conn)
    first = await _generate(db_url)
    second = await _generate(empty_db)
    assert first == second
    assert first["outbox"] == 0  # history, not news: nothing captured


def test_the_module_generates_from_the_command_line(db_url: str) -> None:
    """What `crmflow churn generate` runs (also `python -m engine.churn_history`)."""
    done = subprocess.run(
        [sys.executable, "-m", "engine.churn_history", "--accounts", "50", "--seed", "1",
         "--end", "2026-01-31"],
        env={**os.environ, "CRMFLOW_DATABASE_URL": db_url},
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "generated 50 accounts" in done.stdout, done.stdout
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*), max(created_at) FROM accounts").fetchone()
    assert row is not None and row[0] == 50
    assert row[1].date() <= date(2026, 1, 31)
