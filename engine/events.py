"""Custom events (``POST /events/{name}``) for workflows triggered by ``{"type": "event"}``.

An event is a row of ``crmflow.outbox`` with ``op = 'event'``: the matcher treats it
like a captured change, in order with the entity's other events. An event about an
entity carries the entity's current row, so the workflow's conditions read it.

Senders may sign the raw body with a shared secret (``CRMFLOW_EVENTS_HMAC_SECRET``):
``X-Crmflow-Signature: sha256=<hex HMAC-SHA256 of the body>``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from engine import catalog, db, rows
from engine.model import Issue

EVENT_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")  # as CustomEvent.event
SIGNATURE_PREFIX = "sha256="


class EventError(ValueError):
    """The event was refused; ``issues`` name the offending parts."""

    def __init__(self, issues: list[Issue], status: int = 422) -> None:
        self.issues = issues
        self.status = status
        super().__init__("; ".join(str(i) for i in issues))


def sign(secret: str, body: bytes) -> str:
    """The header value a sender puts in ``X-Crmflow-Signature``."""
    return SIGNATURE_PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signature_ok(secret: str, body: bytes, header: str | None) -> bool:
    if not header or not header.startswith(SIGNATURE_PREFIX):
        return False
    return hmac.compare_digest(sign(secret, body), header.strip())


async def ingest(
    conn: psycopg.AsyncConnection[Any],
    name: str,
    *,
    payload: dict[str, Any] | None = None,
    entity_type: str | None = None,
    entity_id: Any = None,
    actor: str | None = None,
) -> dict[str, Any]:
    """Queue a custom event; returns its outbox id and what it is about."""
    if not EVENT_NAME_RE.fullmatch(name):
        raise EventError([Issue("name", "an event name is 1 to 100 letters, digits or _ . : -")])
    if (entity_type is None) != (entity_id is None):
        missing = "entity_id" if entity_type else "entity_type"
        raise EventError([Issue(missing, "give entity_type and entity_id together")])
    pk = new_row = None
    if entity_type is not None:
        entity = await catalog.load_entity(conn, entity_type)
        if entity is None:
            raise EventError([Issue("entity_type", f"{entity_type!r} is not a watched entity")])
        try:
            new_row = await rows.fetch_row(conn, entity, entity_id)
        except rows.BadEntityId as exc:
            raise EventError([Issue("entity_id", str(exc))]) from None
        if new_row is None:
            raise EventError([Issue("entity_id", f"there is no {entity_type} {entity_id!r}")])
        # The key as captured writes spell it ({"id": 42}, not {"id": "42"}), so the
        # matcher orders this event with the entity's other events.
        pk = {column: new_row[column] for column in entity.pk_columns}
    try:
        row = await _insert(conn, name, entity_type, pk, new_row, payload, actor)
    except psycopg.DataError as exc:  # a string PostgreSQL's jsonb refuses (\u0000)
        reason = exc.diag.message_primary or str(exc)
        raise EventError([Issue("payload", f"not storable as jsonb: {reason}")]) from None
    return {
        "event_id": row["id"],
        "event_name": name,
        "entity_type": entity_type,
        "entity_id": entity_id if pk is None or len(pk) != 1 else next(iter(pk.values())),
        "captured_at": row["captured_at"],
    }


async def _insert(
    conn: psycopg.AsyncConnection[Any],
    name: str,
    entity_type: str | None,
    pk: dict[str, Any] | None,
    new_row: dict[str, Any] | None,
    payload: dict[str, Any] | None,
    actor: str | None,
) -> dict[str, Any]:
    async with conn.transaction():
        row: dict[str, Any] | None = await (
            await conn.execute(
                db.query("insert_event", "events.sql"),
                {
                    "entity_type": entity_type,
                    "pk": Jsonb(pk) if pk is not None else None,
                    "new_row": Jsonb(new_row) if new_row is not None else None,
                    "event_name": name,
                    "payload": Jsonb(payload) if payload is not None else None,
                    "actor": actor,
                },
            )
        ).fetchone()
        await conn.execute(db.query("wake_matcher", "events.sql"), {})
    assert row is not None
    return row
