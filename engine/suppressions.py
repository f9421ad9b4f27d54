"""Suppression lists: entities or email addresses kept out of workflows.

An entry is on a named list (``vip-do-not-contact``, ``unsubscribed``...) and names an
entity (its type and key) or an email address, with an optional reason and an optional
``until`` after which it no longer suppresses. A workflow's ``"suppress": [lists]``
keeps the listed entities from enrolling, on every enrollment path: the matcher
(captured changes and custom events), the scheduler's ticks, manual runs and backfills
all add the one SQL test :func:`not_suppressed` (a ``NOT EXISTS`` on two indexes, inside
their set-based statements). An email entry suppresses the entities whose row's
``email`` field holds that address (compared case-insensitively). ``send_email`` never
sends to an address on the list ``unsubscribed`` (:func:`unsubscribed`).

Used by ``crmflow suppress`` (engine/commands/suppress.py) and ``/suppressions``
(api/routes/suppressions.py).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime, time, timedelta
from email.utils import parseaddr
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from engine import catalog, db
from engine.model import Issue

LIST_RE = re.compile(r"[A-Za-z0-9_.:-]{1,100}")  # fullmatch; as the table's CHECK
UNSUBSCRIBED = "unsubscribed"
MAX_REASON = 1000
MAX_EMAIL = 320


_q = db.Queries("suppressions.sql")


class SuppressionError(ValueError):
    """Refused input; ``issues`` name the field and the reason. Nothing was changed."""

    def __init__(self, issues: list[Issue], status: int = 422) -> None:
        self.issues = issues
        self.status = status
        super().__init__("; ".join(str(i) for i in issues))


def not_suppressed(
    lists: sql.Composable,
    entity_type: sql.Composable,
    entity_key: sql.Composable,
    entity_row: sql.Composable | None = None,
) -> sql.Composable:
    """The SQL test "not on any of these lists now", to AND into an enrollment statement.

    ``lists``: a jsonb array of list names, NULL when the workflow suppresses nothing
    (then nothing is read); ``entity_type``: text; ``entity_key``: the key as jsonb in the
    outbox's form (``{"id": 5}``); ``entity_row``: the row as jsonb, for email entries
    (None: entries by key only). Example, for a backfill scanning ``{table} AS n``::

        suppressions.not_suppressed(
            sql.Literal(Jsonb(definition.get("suppress"))),  # or a column
            sql.Literal(entity.entity_type),
            pk_object,                                       # jsonb_build_object(...)
            sql.SQL("to_jsonb(n)"),
        )
    """
    return db.template("not_suppressed", "suppressions.sql").format(
        lists=lists,
        entity_type=entity_type,
        entity_key=entity_key,
        entity_row=entity_row if entity_row is not None else sql.SQL("NULL::jsonb"),
    )


def lists_literal(definition: dict[str, Any]) -> sql.Composable:
    """A workflow definition's ``suppress`` as the ``lists`` argument of
    :func:`not_suppressed` (a NULL jsonb when it has none)."""
    lists = definition.get("suppress") or None
    if lists is None:
        return sql.SQL("NULL::jsonb")
    return sql.SQL("{}::jsonb").format(sql.Literal(json.dumps(list(lists))))


# ───────────────────────────── checking input ─────────────────────────────


def check_list(name: Any, path: str = "list") -> str:
    if not isinstance(name, str) or not LIST_RE.fullmatch(name):
        raise SuppressionError(
            [
                Issue(
                    path, "a list name is 1 to 100 letters, digits or _ . : - (like 'unsubscribed')"
                )
            ]
        )
    return name


def check_email(given: Any, path: str = "email") -> str:
    if not isinstance(given, str) or not given.strip():
        raise SuppressionError([Issue(path, "an email address is required")])
    address: str = given.strip()
    if len(address) > MAX_EMAIL:
        raise SuppressionError([Issue(path, f"longer than {MAX_EMAIL} characters")])
    parsed = parseaddr(address)[1]
    if parsed != address or "@" not in address or any(c.isspace() for c in address):
        raise SuppressionError([Issue(path, f"{address[:100]!r} is not an email address")])
    return address


def parse_until(value: Any, path: str = "until") -> datetime | None:
    """``until``: a date (the entry suppresses through that day: until the midnight UTC
    that ends it) or an ISO date-time (UTC when it has no offset); None: for good."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime.combine(value + timedelta(days=1), time(), UTC)
    if not isinstance(value, str):
        raise SuppressionError([Issue(path, "a date (2026-12-31) or an ISO date-time")])
    text = value.strip()
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text) + timedelta(days=1), time(), UTC)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise SuppressionError(
            [Issue(path, f"{text[:50]!r} is not a date (2026-12-31) or an ISO date-time")]
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def check_reason(reason: Any, path: str = "reason") -> str | None:
    if reason is None:
        return None
    if not isinstance(reason, str):
        raise SuppressionError([Issue(path, "a reason is text")])
    if len(reason) > MAX_REASON:
        raise SuppressionError([Issue(path, f"longer than {MAX_REASON} characters")])
    if "\x00" in reason:
        raise SuppressionError([Issue(path, "contains a NUL character")])
    return reason


async def entity_key(
    conn: psycopg.AsyncConnection[Any], entity_type: Any, key: Any
) -> dict[str, Any]:
    """The key of ``entity_type`` as the outbox records it, from ``key``: the value of a
    one-column key ("42"), or an object with every key column (``{"a": 1, "b": "x"}``,
    also given as JSON text). Each value is cast to its column's type; the entity need not
    exist (a suppression may come before the row)."""
    if not isinstance(entity_type, str) or not entity_type:
        raise SuppressionError([Issue("entity_type", "an entity type is required")])
    entity = await catalog.load_entity(conn, entity_type)
    if entity is None:
        raise SuppressionError([Issue("entity_type", f"{entity_type!r} is not a watched entity")])
    if isinstance(key, str) and key.strip().startswith("{"):
        try:
            key = json.loads(key)
        except ValueError:
            raise SuppressionError([Issue("key", "not valid JSON")]) from None
    if isinstance(key, dict):
        missing = [c for c in entity.pk_columns if c not in key]
        extra = sorted(set(key) - set(entity.pk_columns))
        if missing or extra:
            raise SuppressionError(
                [
                    Issue(
                        "key",
                        f"the key of {entity_type} is {entity.pk_columns}"
                        + (f"; missing {missing}" if missing else "")
                        + (f"; not key columns: {extra}" if extra else ""),
                    )
                ]
            )
        given = {c: None if key[c] is None else str(key[c]) for c in entity.pk_columns}
    else:
        if key is None or isinstance(key, bool | list) or str(key).strip() == "":
            raise SuppressionError([Issue("key", "the entity's key is required")])
        if len(entity.pk_columns) != 1:
            raise SuppressionError(
                [
                    Issue(
                        "key",
                        f"{entity_type} has a key of {len(entity.pk_columns)} columns "
                        f"{entity.pk_columns}: give them as a JSON object",
                    )
                ]
            )
        given = {entity.pk_columns[0]: str(key).strip()}
    if any(v is None for v in given.values()):
        raise SuppressionError([Issue("key", "a key column cannot be null")])
    if any(len(v or "") > 1000 or "\x00" in (v or "") for v in given.values()):
        raise SuppressionError([Issue("key", "a key value is at most 1,000 characters")])
    statement = db.template("entity_key", "suppressions.sql").format(table=entity.table)
    try:
        async with conn.transaction():
            row = await (
                await conn.execute(statement, {"given": Jsonb(given), "columns": entity.pk_columns})
            ).fetchone()
    except psycopg.DataError as exc:
        reason = exc.diag.message_primary or str(exc)
        raise SuppressionError([Issue("key", f"not a key of {entity_type}: {reason}")]) from None
    assert row is not None
    result: dict[str, Any] = row["entity_key"]
    return result


def _target(entity_type: Any, key: Any, email: Any) -> tuple[str, None] | tuple[None, str]:
    has_entity = entity_type is not None or key is not None
    if has_entity and email is not None:
        raise SuppressionError(
            [Issue("email", "give an entity (entity_type and key) or an email, not both")]
        )
    if not has_entity and email is None:
        raise SuppressionError(
            [Issue("entity_type", "give an entity (entity_type and key) or an email")]
        )
    if has_entity:
        if entity_type is None:
            raise SuppressionError([Issue("entity_type", "a key needs its entity_type")])
        if key is None:
            raise SuppressionError([Issue("key", "an entity_type needs the entity's key")])
        return "entity", None
    return None, check_email(email)


# ───────────────────────────── changes ─────────────────────────────


def present(row: dict[str, Any]) -> dict[str, Any]:
    """An entry as the CLI and the API show it."""
    key = row["entity_key"]
    return {
        "id": row["id"],
        "list": row["list"],
        "entity_type": row["entity_type"],
        "key": (next(iter(key.values())) if isinstance(key, dict) and len(key) == 1 else key),
        "email": row["email"],
        "reason": row["reason"],
        "until": row["until"],
        "created_at": row["created_at"],
        "who": row["who"],
        "active": row["active"],
    }


async def add(
    conn: psycopg.AsyncConnection[Any],
    list_name: Any,
    *,
    entity_type: Any = None,
    key: Any = None,
    email: Any = None,
    until: Any = None,
    reason: Any = None,
    who: str | None = None,
) -> dict[str, Any]:
    """Put an entity or an address on a list (again: its until, reason and who change)."""
    name = check_list(list_name)
    kind, address = _target(entity_type, key, email)
    moment = parse_until(until)
    text = check_reason(reason)
    params: dict[str, Any] = {"list": name, "reason": text, "until": moment, "who": who}
    if kind == "entity":
        pk = await entity_key(conn, entity_type, key)
        statement = _q("add")
        params |= {"entity_type": entity_type, "entity_key": Jsonb(pk), "email": None}
    else:
        statement = _q("add_email")
        params |= {"email": address}
    async with conn.transaction():
        row = await (await conn.execute(statement, params)).fetchone()
    assert row is not None
    return present(row)


async def remove(
    conn: psycopg.AsyncConnection[Any],
    list_name: Any,
    *,
    entity_type: Any = None,
    key: Any = None,
    email: Any = None,
) -> int:
    """Take an entity or an address off a list; how many entries went (0 or 1)."""
    name = check_list(list_name)
    kind, address = _target(entity_type, key, email)
    params: dict[str, Any] = {
        "list": name,
        "email": address,
        "entity_type": None,
        "entity_key": None,
    }
    if kind == "entity":
        params |= {
            "entity_type": entity_type,
            "entity_key": Jsonb(await entity_key(conn, entity_type, key)),
        }
    async with conn.transaction():
        rows = await (await conn.execute(_q("remove"), params)).fetchall()
    return len(rows)


async def entries(
    conn: psycopg.AsyncConnection[Any],
    list_name: Any = None,
    *,
    entity_type: str | None = None,
    email: str | None = None,
    active: bool | None = None,
    limit: int = 1000,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """The entries, of one list or all, oldest first per list."""
    if list_name is not None:
        check_list(list_name)
    rows = await (
        await conn.execute(
            _q("list"),
            {
                "list": list_name,
                "entity_type": entity_type,
                "email": email,
                "active": active,
                "limit": limit,
                "offset": offset,
            },
        )
    ).fetchall()
    return [present(r) for r in rows]


async def unsubscribed(conn: psycopg.AsyncConnection[Any], addresses: list[str]) -> set[str]:
    """The addresses among these (lowercased) on the list ``unsubscribed`` now."""
    if not addresses:
        return set()
    rows = await (await conn.execute(_q("unsubscribed"), {"addresses": addresses})).fetchall()
    return {r["address"] for r in rows}
