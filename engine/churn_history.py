"""A realistic, reproducible customer history for the churn scenario (docs/churn.md).

``crmflow churn generate [--accounts 3000] [--seed 17] [--end DATE]`` (or
:func:`generate`) fills the example CRM's accounts and signal tables with two years of
history. Each account follows a latent *health* process (an AR(1) walk around its own
level, with setbacks: a budget cut, a key contact who leaves); health drives what the CRM
sees (logins and feature usage down, support tickets up, NPS down, invoices paid late)
and the weekly hazard of churning, so the risk factors are actually predictive.
Customers younger than 90 days behave differently: their activity ramps up during
onboarding, everyone logs in, the engaged ones open more (onboarding) tickets, not
fewer, they answer no NPS survey yet, and whether they stay depends on how far they
adopt the product (feature usage) rather than on the mature health process: a model
fitted on the mature accounts misjudges them, which is what the scorecard's own segment
for new customers is for.

Everything is simulated in Python with numpy (vectorised over accounts, one step per
week) from one seed, then sent with COPY: the same seed and end date give the same rows.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg import sql

F = npt.NDArray[np.float64]
I = npt.NDArray[np.int64]  # noqa: E741

DAY = 86400
WEEK = 7 * DAY
FEATURES = ("dashboards", "reports", "automation", "integrations", "exports", "api")
PRIORITIES = ("low", "normal", "high", "urgent")
SIGNAL_TABLES = ("logins", "feature_usage", "support_tickets", "nps_responses", "invoices")
NEW_DAYS = 90  # customers younger than this are "new" (their own segment)

_SYLLABLES = (
    "ac", "al", "ar", "bel", "bor", "cas", "cor", "da", "del", "fin", "gal", "hex", "in",
    "jo", "ka", "lum", "mar", "nex", "no", "or", "pa", "quo", "ra", "sol", "ta", "ul",
    "ven", "vi", "xo", "zen",
)  # fmt: skip
_SUFFIXES = ("Labs", "Systems", "Logistics", "Health", "Foods", "Capital", "Works", "Retail")
_INDUSTRIES = ("Software", "Retail", "Healthcare", "Finance", "Manufacturing", "Education")


@dataclass
class History:
    """The simulated history: columns per table (numpy arrays or lists), times in epoch
    seconds (UTC)."""

    start: int
    end: int
    accounts: dict[str, Any]
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    contacts: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out = {"accounts": len(self.accounts["created"]), "contacts": len(self.contacts["name"])}
        for name, cols in self.tables.items():
            out[name] = len(cols["account"])
        return out


def _sigmoid(x: F) -> F:
    return np.asarray(1.0 / (1.0 + np.exp(-x)), dtype=np.float64)


def _names(rng: np.random.Generator, n: int) -> list[str]:
    a = rng.integers(0, len(_SYLLABLES), size=(n, 3))
    s = rng.integers(0, len(_SUFFIXES), size=n)
    names = []
    for i in range(n):
        stem = "".join(_SYLLABLES[j] for j in a[i, : 2 + (a[i, 2] % 2)]).capitalize()
        names.append(f"{stem} {_SUFFIXES[s[i]]} {i + 1}")
    return names


def simulate(n_accounts: int = 3000, seed: int = 17, end: date | None = None) -> History:
    """Two years of weekly history for ``n_accounts`` accounts ending at ``end`` (today)."""
    rng = np.random.default_rng(seed)
    end_day = end or datetime.now(UTC).date()
    end_ts = int(datetime(end_day.year, end_day.month, end_day.day, tzinfo=UTC).timestamp())
    weeks = 105
    start_ts = end_ts - weeks * WEEK
    n = n_accounts

    # When each account became a customer (days from the start of the window): most
    # before it, the business grows, a quarter in the last 200 days.
    kind = rng.choice(3, size=n, p=[0.55, 0.2, 0.25])
    created_day = np.where(
        kind == 0,
        -rng.uniform(1, 1100, n),
        np.where(
            kind == 1,
            rng.uniform(0, weeks * 7 - 200, n),
            rng.uniform(weeks * 7 - 200, weeks * 7 - 3, n),
        ),
    )
    created = (start_ts + created_day * DAY).astype(np.int64)
    seats = np.clip(np.round(rng.lognormal(2.2, 0.7, n)), 2, 400).astype(np.int64)
    arr = np.round(seats * rng.uniform(600, 1400, n), -2)
    adoption = rng.normal(0.0, 1.0, n)  # how well onboarding goes
    mu = 0.45 * adoption + rng.normal(0.0, 0.6, n)  # the long-run health level
    mu0 = mu.copy()
    health = mu + rng.normal(0.0, 0.5, n)
    # Two to six contacts each, one or two of them key (champion, sponsor).
    n_contacts = rng.integers(2, 7, n)
    contact_account = np.repeat(np.arange(n), n_contacts)
    first = np.concatenate(([0], np.cumsum(n_contacts)[:-1]))
    rank = np.arange(len(contact_account)) - np.repeat(first, n_contacts)
    n_key = 1 + (rng.random(n) < 0.4)
    contact_key = rank < np.repeat(n_key, n_contacts)
    contact_left = np.full(len(contact_account), -1, dtype=np.int64)
    key_slot = first.copy()  # the next key contact to leave, per account

    churned = np.full(n, -1, dtype=np.int64)
    past: list[F] = []
    alive = np.ones(n, dtype=bool)
    ev: dict[str, list[Any]] = {t: [] for t in SIGNAL_TABLES}

    def times(idx: I, lo: F, hi: F) -> I:
        return (lo[idx] + rng.random(len(idx)) * (hi[idx] - lo[idx])).astype(np.int64)

    for w in range(weeks):
        wk0 = start_ts + w * WEEK
        tenure = (wk0 - created) / DAY  # days
        active = alive & (tenure > -7)
        lo = np.maximum(created, wk0).astype(np.float64)
        hi = np.full(n, float(min(wk0 + WEEK, end_ts)))
        new = tenure < NEW_DAYS
        ramp = np.clip((tenure + 7) / 56.0, 0.15, 1.0)
        # Health: AR(1) around the account's level; setbacks now and then.
        setback = rng.random(n) < 0.006
        mu = mu + 0.03 * (mu0 - mu) - setback * rng.uniform(0.8, 2.0, n)
        health = mu + 0.93 * (health - mu) + rng.normal(0.0, 0.22, n)
        # A key contact leaves (more often where health is poor); health takes a hit.
        leaves = active & ~new & (rng.random(n) < _sigmoid(-4.6 - 0.9 * health))
        leaves &= key_slot < first + n_key
        for i in np.flatnonzero(leaves):
            contact_left[key_slot[i]] = int(lo[i] + rng.random() * (hi[i] - lo[i]))
            key_slot[i] += 1
        mu = mu - leaves * 0.8
        health = health - leaves * 0.6
        # What the CRM sees. New customers: driven by adoption, ramping up.
        drive = np.where(new, adoption, health)
        act = np.flatnonzero(active)
        # (everyone logs in during onboarding: logins say little about a new customer)
        logins = rng.poisson(2.6 * np.exp(0.75 * np.where(new, 0.2 * adoption, health)) * ramp)
        uses = rng.poisson(1.0 * np.exp(np.where(new, 1.0, 0.7) * drive) * np.where(new, ramp, 1.0))
        # (engaged new customers ask more onboarding questions, not fewer)
        tickets = rng.poisson(
            np.where(new, 0.5 * np.exp(0.35 * adoption), 0.12 * np.exp(-0.9 * health))
        )
        for table, count in (
            ("logins", logins),
            ("feature_usage", uses),
            ("support_tickets", tickets),
        ):
            idx = np.repeat(act, count[act])
            ev[table].append((idx, times(idx, lo, hi), np.full(len(idx), w)))
        # NPS: a survey a quarter after onboarding, answered by some.
        survey = active & ~new & ((np.floor(tenure / 7).astype(np.int64) % 13) == 6)
        survey &= rng.random(n) < 0.6
        idx = np.flatnonzero(survey)
        ev["nps_responses"].append((idx, times(idx, lo, hi), health[idx]))
        # Invoices every four weeks of tenure; paid late when health is poor.
        billing = active & ((np.floor(tenure / 7).astype(np.int64) % 4) == 0) & (tenure >= 0)
        idx = np.flatnonzero(billing)
        late_p = _sigmoid(-2.2 - 1.3 * health[idx])
        late = rng.random(len(idx)) < late_p
        days_late = np.where(
            late, rng.integers(8, 60, len(idx)), -rng.integers(0, 10, len(idx))
        ).astype(np.int64)
        ev["invoices"].append((idx, times(idx, lo, hi), days_late))
        # Churn: the weekly hazard from health (mature) or adoption (new customers).
        past.append(health.copy())
        decline = np.maximum(0.0, past[-7] - health) if len(past) > 6 else np.zeros(n)
        hazard = np.where(
            new, _sigmoid(-5.3 - 2.0 * adoption), _sigmoid(-7.0 - 2.2 * health + 1.5 * decline)
        )
        leaving = active & (tenure >= 0) & (rng.random(n) < hazard)
        churned[leaving] = (
            lo[leaving] + rng.random(int(leaving.sum())) * (hi - lo)[leaving]
        ).astype(np.int64)
        alive &= ~leaving

    def cat(table: str) -> tuple[I, I, Any]:
        parts = ev[table]
        return (
            np.concatenate([p[0] for p in parts]).astype(np.int64),
            np.concatenate([p[1] for p in parts]).astype(np.int64),
            np.concatenate([p[2] for p in parts]),
        )

    tables: dict[str, dict[str, Any]] = {}
    idx, at, _ = cat("logins")
    tables["logins"] = {"account": idx, "at": at, "user": rng.integers(1, 1 + seats[idx])}
    idx, at, _ = cat("feature_usage")
    tables["feature_usage"] = {
        "account": idx,
        "at": at,
        "feature": rng.integers(0, len(FEATURES), len(idx)),
        "count": 1 + rng.poisson(4.0, len(idx)),
    }
    idx, at, _ = cat("support_tickets")
    severe = rng.random(len(idx))
    priority = np.digitize(severe, [0.2, 0.75, 0.95])
    closed = at + (rng.exponential(3.0, len(idx)) * DAY).astype(np.int64)
    tables["support_tickets"] = {
        "account": idx,
        "at": at,
        "priority": priority,
        "closed": np.where(closed < end_ts, closed, -1),
    }
    idx, at, h = cat("nps_responses")
    score = np.clip(np.round(7.2 + 1.6 * h + rng.normal(0, 1.3, len(idx))), 0, 10)
    tables["nps_responses"] = {"account": idx, "at": at, "score": score.astype(np.int64)}
    idx, at, days_late = cat("invoices")
    due = at // DAY  # epoch day
    paid = (due + days_late) * DAY + rng.integers(8 * 3600, 18 * 3600, len(idx))
    stop = np.where(churned[idx] >= 0, churned[idx] + 30 * DAY, end_ts)
    paid = np.where((paid < end_ts) & (paid < stop), paid, -1)
    tables["invoices"] = {
        "account": idx,
        "due": due,
        "paid": paid,
        "amount": np.round(arr[idx] / 13.0, 2),
    }
    rng_names = np.random.default_rng(seed + 1)
    accounts = {
        "name": _names(rng_names, n),
        "created": created,
        "churned": churned,
        "seats": seats,
        "arr": arr,
        "industry": rng_names.integers(0, len(_INDUSTRIES), n),
        "renewal": created // DAY + 365 * (1 + np.maximum(0, (end_ts - created) // (365 * DAY))),
    }
    contacts = {
        "account": contact_account,
        "key": contact_key,
        "left": contact_left,
        "name": [f"Contact {i + 1}" for i in range(len(contact_account))],
    }
    return History(start_ts, end_ts, accounts, tables, contacts)


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
        await cur.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
        await cur.execute("SET LOCAL statement_timeout = 0")
        su = await (
            await cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        ).fetchone()
        if su and (su["rolsuper"] if isinstance(su, dict) else su[0]):
            await cur.execute("SET LOCAL session_replication_role = replica")
        await cur.execute(
            "SELECT nextval(pg_get_serial_sequence('accounts', 'id')) AS id"
            " FROM generate_series(1, %s)",
            [n],
        )
        ids = np.array(
            [r["id"] if isinstance(r, dict) else r[0] for r in await cur.fetchall()], dtype=np.int64
        )
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
                [_INDUSTRIES[i] for i in a["industry"].tolist()],
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
        t = h.tables["logins"]
        await _copy(
            cur,
            "logins",
            ("account_id", "user", "occurred_at"),
            _rows(
                ids[t["account"]].tolist(), [f"user{u}" for u in t["user"].tolist()], _ts(t["at"])
            ),
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
        for table in ("accounts", "contacts", *SIGNAL_TABLES):
            await cur.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))
    return Generated(h.counts(), time.monotonic() - started, int(ids[0]) if n else 0, end)


if __name__ == "__main__":  # python -m engine.churn_history [--accounts N ...]
    from engine.commands.churn import main

    raise SystemExit(main())
