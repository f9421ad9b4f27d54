"""A realistic, reproducible customer history for the churn scenario (docs/churn.md).

``crmflow churn generate [--accounts 3000] [--seed 17] [--end DATE]`` (or
:func:`generate`) fills the example CRM's accounts and signal tables with two years of
history, simulated by ``engine.churn_simulation`` (:func:`simulate`: a latent health
process per account drives its signals and its hazard of churning; new customers behave
differently), then sent with COPY: the same seed and end date give the same rows.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from engine.churn_simulation import (
    DAY,
    FEATURES,
    INDUSTRIES,
    NEW_DAYS,
    PRIORITIES,
    SIGNAL_TABLES,
    WEEK,
    F,
    History,
    I,
    simulate,
)

__all__ = [
    "DAY",
    "FEATURES",
    "NEW_DAYS",
    "PRIORITIES",
    "SIGNAL_TABLES",
    "WEEK",
    "F",
    "Generated",
    "History",
    "I",
    "generate",
    "simulate",
]


def _ts(values: I) -> list[str]:
    """Epoch seconds as ISO timestamps (``\\N`` for -1), vectorised."""
    text = np.datetime_as_string(values.astype("datetime64[s]"), timezone="UTC").tolist()
    return [r"\N" if v < 0 else t for v, t in zip(values.tolist(), text, strict=True)]


def _day(values: I) -> list[str]:
    text: list[str] = np.datetime_as_string(values.astype("datetime64[D]")).tolist()
    return text


def _rows(*columns: Sequence[Any]) -> bytes:
    return ("\n".join("\t".join(map(str, r)) for r in zip(*columns, strict=True)) + "\n").encode()


@dataclass
class Generated:
    counts: dict[str, int]
    seconds: float
    first_account_id: int
    end: date


async def _copy(
    cur: psycopg.AsyncCursor[Any], table: str, cols: Sequence[str], data: bytes
) -> None:
    stmt = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, cols))
    )
    async with cur.copy(stmt) as copy:
        await copy.write(data)


async def generate(
    conn: psycopg.AsyncConnection[Any],
    n_accounts: int = 3000,
    seed: int = 17,
    end: date | None = None,
    schema: str = "public",
) -> Generated:
    """Simulate and insert the history into the example CRM (in ``schema``), in one
    transaction. The accounts get new ids from the table's own sequence; the history's
    writes skip the capture triggers when the role may do so (they are history, not
    news for the workflows)."""
    started = time.monotonic()
    end = end or datetime.now(UTC).date()
    h = simulate(n_accounts, seed, end)
    n = n_accounts
    async with conn.transaction(), conn.cursor() as cur:
        await _prepare(cur, schema)
        ids = await _new_ids(cur, n)
        await _copy_accounts(cur, h, ids)
        await _copy_signals(cur, h, ids)
        for table in ("accounts", "contacts", *SIGNAL_TABLES):
            await cur.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))
    return Generated(h.counts(), time.monotonic() - started, int(ids[0]) if n else 0, end)


async def _prepare(cur: psycopg.AsyncCursor[Any], schema: str) -> None:
    """The transaction's settings: the CRM's schema, no statement timeout, and the
    capture triggers skipped where the role may (a superuser)."""
    await cur.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
    await cur.execute("SET LOCAL statement_timeout = 0")
    su = await (
        await cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    ).fetchone()
    if su and (su["rolsuper"] if isinstance(su, dict) else su[0]):
        await cur.execute("SET LOCAL session_replication_role = replica")


async def _new_ids(cur: psycopg.AsyncCursor[Any], n: int) -> I:
    """``n`` new account ids from the accounts table's own sequence."""
    await cur.execute(
        "SELECT nextval(pg_get_serial_sequence('accounts', 'id')) AS id"
        " FROM generate_series(1, %s)",
        [n],
    )
    return np.array(
        [r["id"] if isinstance(r, dict) else r[0] for r in await cur.fetchall()], dtype=np.int64
    )


async def _copy_accounts(cur: psycopg.AsyncCursor[Any], h: History, ids: I) -> None:
    """The accounts (with the ids given) and their contacts."""
    a = h.accounts
    renewal = a["renewal"]
    await _copy(
        cur,
        "accounts",
        (
            "id",
            "name",
            "industry",
            "employees",
            "arr",
            "renewal_date",
            "created_at",
            "updated_at",
            "churned_at",
        ),
        _rows(
            ids.tolist(),
            a["name"],
            [INDUSTRIES[i] for i in a["industry"].tolist()],
            (a["seats"] * 3).tolist(),
            a["arr"].tolist(),
            _day(renewal),
            _ts(a["created"]),
            _ts(a["created"]),
            _ts(a["churned"]),
        ),
    )
    c = h.contacts
    await _copy(
        cur,
        "contacts",
        ("account_id", "name", "title", "key_contact", "left_at", "created_at"),
        _rows(
            ids[c["account"]].tolist(),
            c["name"],
            ["Champion" if k else "User" for k in c["key"].tolist()],
            ["t" if k else "f" for k in c["key"].tolist()],
            _ts(c["left"]),
            _ts(a["created"][c["account"]]),
        ),
    )


async def _copy_signals(cur: psycopg.AsyncCursor[Any], h: History, ids: I) -> None:
    """The signal tables: logins, feature usage, tickets, NPS answers, invoices."""
    t = h.tables["logins"]
    await _copy(
        cur,
        "logins",
        ("account_id", "user", "occurred_at"),
        _rows(ids[t["account"]].tolist(), [f"user{u}" for u in t["user"].tolist()], _ts(t["at"])),
    )
    t = h.tables["feature_usage"]
    await _copy(
        cur,
        "feature_usage",
        ("account_id", "feature", "count", "occurred_at"),
        _rows(
            ids[t["account"]].tolist(),
            [FEATURES[f] for f in t["feature"].tolist()],
            t["count"].tolist(),
            _ts(t["at"]),
        ),
    )
    t = h.tables["support_tickets"]
    await _copy(
        cur,
        "support_tickets",
        ("account_id", "subject", "priority", "opened_at", "closed_at"),
        _rows(
            ids[t["account"]].tolist(),
            ["Question" for _ in range(len(t["account"]))],
            [PRIORITIES[p] for p in t["priority"].tolist()],
            _ts(t["at"]),
            _ts(t["closed"]),
        ),
    )
    t = h.tables["nps_responses"]
    await _copy(
        cur,
        "nps_responses",
        ("account_id", "score", "responded_at"),
        _rows(ids[t["account"]].tolist(), t["score"].tolist(), _ts(t["at"])),
    )
    t = h.tables["invoices"]
    await _copy(
        cur,
        "invoices",
        ("account_id", "amount", "due_date", "paid_at"),
        _rows(ids[t["account"]].tolist(), t["amount"].tolist(), _day(t["due"]), _ts(t["paid"])),
    )


if __name__ == "__main__":  # python -m engine.churn_history [--accounts N ...]
    from engine.commands.churn import main

    raise SystemExit(main())
