"""Enrollment lifecycle: a workflow's ``goal`` and ``exit_when``, and ``wait_until`` steps.

- ``"goal": <conditions>``: once the enrolled entity meets it, the execution ends
  ``completed`` with ``goal_met_at`` set, its remaining steps ``skipped`` ("goal met").
- ``"exit_when": <conditions>``: unenrollment: the execution ends ``cancelled`` ("exit
  criteria").
- a step's ``"wait_until": {"conditions": ...} | {"event": NAME}`` with a ``timeout``:
  the step waits until the entity meets the conditions, the custom event about it
  arrives, or the timeout passes; then it runs, its result saying which
  (``{"outcome": "met" | "event" | "timed_out"}``).

Where they are evaluated:

- by the matcher, set-based, on every captured change: an execution that starts waiting
  (a delay, a wait) leaves rows in ``crmflow.watches`` (entity, kind, step); each
  matcher round runs ONE extra statement (:func:`run_round`, sql/lifecycle.sql
  ``round``) that joins the round's events to the watches of their entities and
  evaluates each version's compiled conditions (engine/conditions.py) on the entity's
  row as it is now, read by its key; the hits end, or wake, in the round's transaction.
  Nothing polls the waiting executions. A hit on an execution another transaction holds
  (the round never waits for a lock) is kept in ``crmflow.watch_hits`` and the
  execution made due at once: the executor settles it (:func:`settle_kept`) once the
  holder lets go, or the next round does;
- by the executor before each step (:func:`before_step`): its kept hits, then an
  execution that met its goal while it was running ends there; and once more when it
  writes a watch, after the watch commits (a change committed between its look and the
  watch was seen by no round);
- a wait that times out is checked once more on the row as it is then (a change that
  raced with the writing of its watch is not lost: it is "met", not "timed_out").

The modules: engine/lifecycle_definitions.py (save-time checks, the compiled
predicates), engine/lifecycle_round.py (the matcher's round), engine/lifecycle_executor.py
(the executor's side: watches, kept hits, the checks before each step, wait_until
steps); this one re-exports their names (``from engine.lifecycle import ...`` and
``lifecycle.X`` as before) and lists the enrollments.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import psycopg

from engine import db
from engine.lifecycle_definitions import (
    EVENT,
    EXIT,
    EXIT_CRITERIA,
    GOAL,
    GOAL_MET,
    MET,
    SKIPPED,
    TIMED_OUT,
    WAIT,
    Predicates,
    capture_filter,
    check,
    has_lifecycle,
    predicates,
    predicates_of,
)
from engine.lifecycle_executor import (
    add_watches,
    before_step,
    settle_kept,
    wait_step,
    watch_waiting,
)
from engine.lifecycle_round import (
    RoundPlan,
    broken_workflows,
    build_round,
    record_broken,
    run_round,
    run_round_carefully,
)

__all__ = [
    "EVENT",
    "EXIT",
    "EXIT_CRITERIA",
    "GOAL",
    "GOAL_MET",
    "MET",
    "SKIPPED",
    "TIMED_OUT",
    "WAIT",
    "EnrollmentState",
    "Predicates",
    "RoundPlan",
    "add_watches",
    "before_step",
    "broken_workflows",
    "build_round",
    "capture_filter",
    "check",
    "has_lifecycle",
    "list_enrollments",
    "predicates",
    "predicates_of",
    "record_broken",
    "run_round",
    "run_round_carefully",
    "settle_kept",
    "wait_step",
    "watch_waiting",
]

_q = db.Queries("lifecycle.sql")


class EnrollmentState(StrEnum):
    """An enrollment's state in ``crmflow.enrollments`` (derived from the execution)."""

    ACTIVE = "active"  # pending or running
    WAITING = "waiting"  # a delay, a wait_until or a retry
    COMPLETED = "completed"
    GOAL_MET = "goal_met"  # completed: the entity met the workflow's goal
    EXITED = "exited"  # cancelled (exit criteria, or by hand) or skipped
    FAILED = "failed"


async def list_enrollments(
    conn: psycopg.AsyncConnection[Any],
    workflow_id: int,
    state: EnrollmentState | None = None,
    before_id: int | None = None,
    limit: int = 50,
) -> dict[str, Any]:
    """A workflow's enrollments, newest first (``before_id``: the page after), and how
    many are in each state."""
    from engine.executor.context import entity_id_of

    params = {
        "workflow_id": workflow_id,
        "state": None if state is None else str(state),
        "before_id": before_id,
        "limit": limit,
    }
    items = await (await conn.execute(_q("list_enrollments"), params)).fetchall()
    for item in items:
        item["entity_id"] = entity_id_of(item.pop("entity_pk"))
    counts = {str(s): 0 for s in EnrollmentState}
    for row in await (await conn.execute(_q("enrollment_counts"), params)).fetchall():
        counts[row["state"]] = int(row["n"])
    return {
        "items": items,
        "counts": counts,
        "next_cursor": items[-1]["execution_id"] if len(items) == limit else None,
    }
