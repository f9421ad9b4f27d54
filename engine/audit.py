"""The audit trail of workflows: who created, changed, activated, paused or archived one,
when, and what changed (``crmflow.workflow_changes``, migration 0026).

:mod:`engine.workflows` records each change in the transaction that makes it, so a
change and its row commit or roll back together. A save that changes nothing (the same
definition and status applied again) records nothing.

Who: the ``actor`` a caller passes; else the one set for the current context with
:func:`acting_as` (the API sets the API key's name for each request); else the OS user
(``getpass.getuser()``), which is who runs the CLI.

What: a structural diff of the definition before and after, ``status`` included as if
it were a key of the definition: a list of ``{"path", "before", "after"}`` with paths
as validation errors name them (``conditions[0].value``, ``limits.max_per_minute``).
A key or item that was absent on one side has no ``before`` (or no ``after``).
"""

from __future__ import annotations

import contextlib
import getpass
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from engine import db
from engine.statuses import WorkflowChange

_actor: ContextVar[str | None] = ContextVar("crmflow_actor", default=None)

# The action a status change is recorded as.
STATUS_ACTIONS: dict[str, WorkflowChange] = {
    "active": WorkflowChange.ACTIVATE,
    "paused": WorkflowChange.PAUSE,
    "archived": WorkflowChange.ARCHIVE,
}
HISTORY_LIMIT = 1000


def _q(name: str) -> str:
    return db.query(name, "audit.sql")


def set_actor(name: str | None) -> None:
    """Name who acts for the rest of this context (a request's task, say)."""
    _actor.set(name)


@contextlib.contextmanager
def acting_as(name: str | None) -> Iterator[None]:
    token = _actor.set(name)
    try:
        yield
    finally:
        _actor.reset(token)


def os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, no LOGNAME: a container's anonymous uid
        return "unknown"


def current_actor(explicit: str | None = None) -> str:
    return explicit or _actor.get() or os_user()


# ───────────────────────────── diff ─────────────────────────────


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


_ABSENT = object()


def diff(before: Any, after: Any) -> list[dict[str, Any]]:
    """The paths where ``after`` differs from ``before``: objects compared key by key,
    lists item by item (an added or removed item is one entry), the rest by value.
    ``None`` for a side means no definition at all (before a creation)."""
    changes: list[dict[str, Any]] = []
    # No definition on one side (a creation): each top-level key is added (or removed).
    if before is None and isinstance(after, dict):
        before = {}
    if after is None and isinstance(before, dict):
        after = {}
    _diff("", _ABSENT if before is None else before, _ABSENT if after is None else after, changes)
    return changes


def _diff(path: str, before: Any, after: Any, out: list[dict[str, Any]]) -> None:
    if isinstance(before, dict) and isinstance(after, dict):
        for key in sorted(before.keys() | after.keys(), key=str):
            _diff(_join(path, key), before.get(key, _ABSENT), after.get(key, _ABSENT), out)
        return
    if isinstance(before, list) and isinstance(after, list):
        for i in range(max(len(before), len(after))):
            _diff(
                _join(path, i),
                before[i] if i < len(before) else _ABSENT,
                after[i] if i < len(after) else _ABSENT,
                out,
            )
        return
    if before is _ABSENT and after is _ABSENT:
        return
    # 1 and 1.0, True and 1: JSON tells them apart, so do we (type and value).
    if (
        before is not _ABSENT
        and after is not _ABSENT
        and type(before) is type(after)
        and before == after
    ):
        return
    entry: dict[str, Any] = {"path": path or "$"}
    if before is not _ABSENT:
        entry["before"] = before
    if after is not _ABSENT:
        entry["after"] = after
    out.append(entry)


def state(definition: dict[str, Any] | None, status: str | None) -> dict[str, Any] | None:
    """What the diff compares: the stored definition with the workflow's status."""
    if definition is None:
        return None
    return {**definition, "status": status}


# ───────────────────────────── storage ─────────────────────────────


async def snapshot(conn: psycopg.AsyncConnection[Any], workflow_id: int) -> dict[str, Any] | None:
    """The workflow's status, version and definition, its row locked until the change
    commits (None: no such workflow)."""
    row: dict[str, Any] | None = await (
        await conn.execute(_q("workflow_snapshot"), {"id": workflow_id})
    ).fetchone()
    return row


async def record(
    conn: psycopg.AsyncConnection[Any],
    workflow_id: int,
    version: int,
    action: str,
    changes: list[dict[str, Any]],
    actor: str | None = None,
) -> dict[str, Any]:
    """One row of the audit trail, in the caller's transaction."""
    row: dict[str, Any] | None = await (
        await conn.execute(
            _q("insert_change"),
            {
                "workflow_id": workflow_id,
                "version": version,
                "actor": current_actor(actor),
                "action": WorkflowChange(action).value,
                "diff": Jsonb(changes),
            },
        )
    ).fetchone()
    assert row is not None
    return row


async def history(
    conn: psycopg.AsyncConnection[Any], workflow_id: int, limit: int = HISTORY_LIMIT
) -> list[dict[str, Any]]:
    """The workflow's changes, oldest first."""
    rows: list[dict[str, Any]] = await (
        await conn.execute(_q("list_changes"), {"id": workflow_id, "limit": limit})
    ).fetchall()
    return rows
