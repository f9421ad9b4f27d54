"""The churn scenario's customer history, simulated (docs/churn.md); ``engine.churn_history``
inserts it into the example CRM.

Each account follows a latent *health* process (an AR(1) walk around its own level, with
setbacks: a budget cut, a key contact who leaves); health drives what the CRM sees
(logins and feature usage down, support tickets up, NPS down, invoices paid late) and
the weekly hazard of churning, so the risk factors are actually predictive. Customers
younger than 90 days behave differently: their activity ramps up during onboarding,
everyone logs in, the engaged ones open more (onboarding) tickets, not fewer, they
answer no NPS survey yet, and whether they stay depends on how far they adopt the
product (feature usage) rather than on the mature health process: a model fitted on the
mature accounts misjudges them, which is what the scorecard's own segment for new
customers is for.

Everything is simulated with numpy (vectorised over accounts, one step per week) from
one seed: the same seed and end date give the same history. The order of the random
draws is part of that: a change to it changes every history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

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
INDUSTRIES = ("Software", "Retail", "Healthcare", "Finance", "Manufacturing", "Education")


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


@dataclass
class _Accounts:
    """The simulated accounts and their contacts, advanced a week at a time (arrays
    indexed by account, the contacts' by contact)."""

    created: Any  # epoch seconds
    seats: Any
    arr: Any
    adoption: Any  # how well onboarding goes
    mu0: Any  # the long-run health level, at the start
    mu: Any  # the long-run health level, setbacks included
    health: Any
    contact_account: Any
    contact_key: Any
    contact_left: Any  # epoch seconds, -1: still there
    first: Any  # per account: its first contact
    n_key: Any  # per account: how many key contacts
    key_slot: Any  # per account: the next key contact to leave
    churned: Any  # epoch seconds, -1: still a customer
    alive: Any
    past: list[F] = field(default_factory=list)  # health, week by week


def _accounts(rng: np.random.Generator, n: int, start_ts: int, weeks: int) -> _Accounts:
    """The accounts as the window opens: when each became a customer, its size, its
    health, its contacts."""
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
    return _Accounts(
        created=created,
        seats=seats,
        arr=arr,
        adoption=adoption,
        mu0=mu0,
        mu=mu,
        health=health,
        contact_account=contact_account,
        contact_key=rank < np.repeat(n_key, n_contacts),
        contact_left=np.full(len(contact_account), -1, dtype=np.int64),
        first=first,
        n_key=n_key,
        key_slot=first.copy(),
        churned=np.full(n, -1, dtype=np.int64),
        alive=np.ones(n, dtype=bool),
    )


def simulate(n_accounts: int = 3000, seed: int = 17, end: date | None = None) -> History:
    """Two years of weekly history for ``n_accounts`` accounts ending at ``end`` (today)."""
    rng = np.random.default_rng(seed)
    end_day = end or datetime.now(UTC).date()
    end_ts = int(datetime(end_day.year, end_day.month, end_day.day, tzinfo=UTC).timestamp())
    weeks = 105
    start_ts = end_ts - weeks * WEEK
    n = n_accounts
    a = _accounts(rng, n, start_ts, weeks)
    ev: dict[str, list[Any]] = {t: [] for t in SIGNAL_TABLES}
    for w in range(weeks):
        _week(rng, a, w, start_ts + w * WEEK, end_ts, ev)
    tables = _tables(rng, a, ev, end_ts)
    rng_names = np.random.default_rng(seed + 1)
    created = a.created
    accounts = {
        "name": _names(rng_names, n),
        "created": created,
        "churned": a.churned,
        "seats": a.seats,
        "arr": a.arr,
        "industry": rng_names.integers(0, len(INDUSTRIES), n),
        "renewal": created // DAY + 365 * (1 + np.maximum(0, (end_ts - created) // (365 * DAY))),
    }
    contacts = {
        "account": a.contact_account,
        "key": a.contact_key,
        "left": a.contact_left,
        "name": [f"Contact {i + 1}" for i in range(len(a.contact_account))],
    }
    return History(start_ts, end_ts, accounts, tables, contacts)


def _week(
    rng: np.random.Generator,
    a: _Accounts,
    w: int,
    wk0: int,
    end_ts: int,
    ev: dict[str, list[Any]],
) -> None:
    """Week ``w`` (starting at ``wk0``): health moves, key contacts leave, the CRM's
    signals (into ``ev``), churn."""
    n = len(a.created)
    tenure = (wk0 - a.created) / DAY  # days
    active = a.alive & (tenure > -7)
    lo = np.maximum(a.created, wk0).astype(np.float64)
    hi = np.full(n, float(min(wk0 + WEEK, end_ts)))
    new = tenure < NEW_DAYS
    # Health: AR(1) around the account's level; setbacks now and then.
    setback = rng.random(n) < 0.006
    a.mu = a.mu + 0.03 * (a.mu0 - a.mu) - setback * rng.uniform(0.8, 2.0, n)
    a.health = a.mu + 0.93 * (a.health - a.mu) + rng.normal(0.0, 0.22, n)
    # A key contact leaves (more often where health is poor); health takes a hit.
    leaves = active & ~new & (rng.random(n) < _sigmoid(-4.6 - 0.9 * a.health))
    leaves &= a.key_slot < a.first + a.n_key
    for i in np.flatnonzero(leaves):
        a.contact_left[a.key_slot[i]] = int(lo[i] + rng.random() * (hi[i] - lo[i]))
        a.key_slot[i] += 1
    a.mu = a.mu - leaves * 0.8
    a.health = a.health - leaves * 0.6
    _signals(rng, a, w, tenure, active, new, lo, hi, ev)
    # Churn: the weekly hazard from health (mature) or adoption (new customers).
    health = a.health
    a.past.append(health.copy())
    decline = np.maximum(0.0, a.past[-7] - health) if len(a.past) > 6 else np.zeros(n)
    hazard = np.where(
        new, _sigmoid(-5.3 - 2.0 * a.adoption), _sigmoid(-7.0 - 2.2 * health + 1.5 * decline)
    )
    leaving = active & (tenure >= 0) & (rng.random(n) < hazard)
    a.churned[leaving] = (lo[leaving] + rng.random(int(leaving.sum())) * (hi - lo)[leaving]).astype(
        np.int64
    )
    a.alive &= ~leaving


def _signals(
    rng: np.random.Generator,
    a: _Accounts,
    w: int,
    tenure: F,
    active: npt.NDArray[np.bool_],
    new: npt.NDArray[np.bool_],
    lo: F,
    hi: F,
    ev: dict[str, list[Any]],
) -> None:
    """What the CRM sees of week ``w``: logins, feature usage, tickets, NPS answers and
    invoices (account, time and a value per event, appended to ``ev``)."""
    n = len(a.created)
    health, adoption = a.health, a.adoption

    def times(idx: I, lo: F, hi: F) -> I:
        return (lo[idx] + rng.random(len(idx)) * (hi[idx] - lo[idx])).astype(np.int64)

    ramp = np.clip((tenure + 7) / 56.0, 0.15, 1.0)
    # New customers: driven by adoption, ramping up.
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


def _concat(parts: list[Any]) -> tuple[I, I, Any]:
    """A table's weekly events joined: accounts, times, values."""
    return (
        np.concatenate([p[0] for p in parts]).astype(np.int64),
        np.concatenate([p[1] for p in parts]).astype(np.int64),
        np.concatenate([p[2] for p in parts]),
    )


def _tables(
    rng: np.random.Generator, a: _Accounts, ev: dict[str, list[Any]], end_ts: int
) -> dict[str, dict[str, Any]]:
    """The signal tables' columns from the weekly events (and the details drawn now)."""
    seats, churned = a.seats, a.churned
    tables: dict[str, dict[str, Any]] = {}
    idx, at, _ = _concat(ev["logins"])
    tables["logins"] = {"account": idx, "at": at, "user": rng.integers(1, 1 + seats[idx])}
    idx, at, _ = _concat(ev["feature_usage"])
    tables["feature_usage"] = {
        "account": idx,
        "at": at,
        "feature": rng.integers(0, len(FEATURES), len(idx)),
        "count": 1 + rng.poisson(4.0, len(idx)),
    }
    idx, at, _ = _concat(ev["support_tickets"])
    severe = rng.random(len(idx))
    priority = np.digitize(severe, [0.2, 0.75, 0.95])
    closed = at + (rng.exponential(3.0, len(idx)) * DAY).astype(np.int64)
    tables["support_tickets"] = {
        "account": idx,
        "at": at,
        "priority": priority,
        "closed": np.where(closed < end_ts, closed, -1),
    }
    idx, at, h = _concat(ev["nps_responses"])
    score = np.clip(np.round(7.2 + 1.6 * h + rng.normal(0, 1.3, len(idx))), 0, 10)
    tables["nps_responses"] = {"account": idx, "at": at, "score": score.astype(np.int64)}
    idx, at, days_late = _concat(ev["invoices"])
    due = at // DAY  # epoch day
    paid = (due + days_late) * DAY + rng.integers(8 * 3600, 18 * 3600, len(idx))
    stop = np.where(churned[idx] >= 0, churned[idx] + 30 * DAY, end_ts)
    paid = np.where((paid < end_ts) & (paid < stop), paid, -1)
    tables["invoices"] = {
        "account": idx,
        "due": due,
        "paid": paid,
        "amount": np.round(a.arr[idx] / 13.0, 2),
    }
    return tables
