"""``dedupe_key`` of create_task and send_notification: one open item per key.

A step with ``"dedupe_key": "{{ account.id }}:churn"`` renders the key; while an item
it made under that key is open (a task without ``completed_at``, a notification without
``read_at``), the step updates that item instead of adding another. The keys and the
items they made are crmflow's bookkeeping (``crmflow.dedupe_keys``, migration 0025):
the CRM's tables get no column.

Concurrency: every step first upserts its keys' rows, in key order, in the step's
transaction; a second execution with the same key waits there until the first commits,
then sees the item it made. Locking in key order keeps two batches with overlapping keys
from deadlocking.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine import db
from engine.actions.base import PermanentError

if TYPE_CHECKING:
    from engine.executor.context import StepContext

MAX_KEY = 500


_q = db.Queries("dedupe.sql")


def render_key(ctx: StepContext, template: str) -> str:
    key = (ctx.render(template) or "").strip()
    if not key:
        raise PermanentError("dedupe_key rendered to an empty text for this entity")
    if len(key) > MAX_KEY:
        raise PermanentError(f"dedupe_key rendered to more than {MAX_KEY} characters")
    return key


async def lock_keys(contexts: list[StepContext], kind: str, keys: list[str]) -> None:
    """Upsert the rows of these keys, locked in key order, in the step's transaction."""
    distinct = sorted(set(keys))
    first = contexts[0]
    await first.require_conn().execute(
        _q("lock_keys"),
        {
            "kind": kind,
            "keys": distinct,
            "workflow_id": first.workflow_id,
            "execution_id": first.execution_id,
        },
    )


async def open_items(
    ctx: StepContext, kind: str, key: str, table: Any, open_column: str
) -> list[int]:
    """The items this key made that are still open, locked for the update."""
    from psycopg import sql

    query = sql.SQL(_q("open_items")).format(table=table, open_column=sql.Identifier(open_column))
    rows = await (await ctx.require_conn().execute(query, {"kind": kind, "key": key})).fetchall()
    return [r["id"] for r in rows]


async def remember(ctx: StepContext, kind: str, key: str, ids: list[int], updated: bool) -> None:
    await ctx.require_conn().execute(
        _q("remember"),
        {
            "kind": kind,
            "key": key,
            "ids": ids,
            "updated": updated,
            "workflow_id": ctx.workflow_id,
            "execution_id": ctx.execution_id,
        },
    )
