"""Alerts: the engine watching itself with its own rules.

Every ``alert_interval`` seconds one worker (advisory lock) compares each workflow's
failure rate over the last ``alert_window`` and the outbox's oldest pending event with
their thresholds, and lists the active workflows broken by schema drift (the matcher
raises those at once, when it finds one). Crossing one inserts a row in
``crmflow.alerts`` (at most one open per kind and subject); going back under resolves
it. crmflow watches that table as entity ``crmflow_alert``, so an ordinary workflow
delivers the alert — a notification, an email, a webhook
(examples/workflows/05_alert_managers.json).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg

from engine import db
from engine.config import Settings

log = logging.getLogger(__name__)


_q = db.Queries("alerts.sql")


@dataclass
class AlertChange:
    kind: str
    subject: str
    raised: bool  # False: resolved


async def _set(
    conn: psycopg.AsyncConnection[Any], firing: bool, params: dict[str, Any]
) -> AlertChange | None:
    if firing:
        row = await (await conn.execute(_q("raise_alert"), params)).fetchone()
        return AlertChange(params["kind"], params["subject"], True) if row else None
    row = await (
        await conn.execute(
            _q("resolve_alert"), {"kind": params["kind"], "subject": params["subject"]}
        )
    ).fetchone()
    return AlertChange(params["kind"], params["subject"], False) if row else None


async def _broken_workflows(conn: psycopg.AsyncConnection[Any]) -> list[AlertChange]:
    """One alert per broken active workflow (the matcher raises it when it finds one;
    this catches up and resolves those that compile again or were paused)."""
    from engine.matcher import broken_workflows

    changes = []
    broken = {b["name"]: b for b in await broken_workflows(conn)}
    for name, b in broken.items():
        change = await _set(
            conn,
            True,
            {
                "kind": "workflow_broken",
                "subject": name,
                "workflow_id": b["id"],
                "value": 1,
                "threshold": 0,
                "message": f"Workflow '{name}' ({b['id']}) is broken and matches nothing: "
                f"{b['reason']}",
            },
        )
        if change:
            changes.append(change)
    opened = await (await conn.execute(_q("open_alerts"), {})).fetchall()
    for a in opened:
        if a["kind"] == "workflow_broken" and a["subject"] not in broken:
            change = await _set(conn, False, {"kind": a["kind"], "subject": a["subject"]})
            if change:
                changes.append(change)
    return changes


async def check(conn: psycopg.AsyncConnection[Any], settings: Settings) -> list[AlertChange]:
    """Raise and resolve alerts; returns what changed (nothing if another worker checks)."""
    changes: list[AlertChange] = []
    async with conn.transaction():
        lock = await (await conn.execute(_q("lock_alert_check"), {})).fetchone()
        if not lock or not lock["mine"]:
            return changes
        rates = await (
            await conn.execute(_q("failure_rates"), {"window": settings.alert_window})
        ).fetchall()
        for r in rates:
            rate = r["failed"] / r["finished"]
            firing = (
                r["finished"] >= settings.alert_min_executions
                and rate > settings.alert_failure_rate
            )
            change = await _set(
                conn,
                firing,
                {
                    "kind": "failure_rate",
                    "subject": r["name"],
                    "workflow_id": r["workflow_id"],
                    "value": rate,
                    "threshold": settings.alert_failure_rate,
                    "message": f"Workflow '{r['name']}': {rate:.0%} of {r['finished']} executions "
                    f"failed in the last {settings.alert_window / 60:g} min "
                    f"(threshold {settings.alert_failure_rate:.0%})",
                },
            )
            if change:
                changes.append(change)
        age_row = await (await conn.execute(_q("outbox_age"), {})).fetchone()
        age = float(age_row["age"]) if age_row else 0.0
        change = await _set(
            conn,
            age > settings.alert_outbox_age,
            {
                "kind": "outbox_age",
                "subject": "outbox",
                "workflow_id": None,
                "value": age,
                "threshold": settings.alert_outbox_age,
                "message": f"The oldest unmatched event waits for {age:.0f}s "
                f"(threshold {settings.alert_outbox_age:g}s): is a worker running?",
            },
        )
        if change:
            changes.append(change)
        changes += await _broken_workflows(conn)
    for c in changes:
        log.warning("alert %s: %s %s", "raised" if c.raised else "resolved", c.kind, c.subject)
    return changes
