"""send_notification: rows in the CRM's ``notifications`` table, plus a NOTIFY.

The NOTIFY goes to the channel ``crmflow_notifications`` with a JSON payload
``{"notification_ids": [...], "recipient_ids": [...], "entity_type", "entity_id",
"message"}`` (message cut to 1,000 characters). It is sent when the step commits.
A payload too long for PostgreSQL's NOTIFY is cut down (see :func:`notify_payload`).
"""

from __future__ import annotations

import json
from typing import Any

from psycopg import sql
from pydantic import Field

from engine.actions import dedupe
from engine.actions.base import Action, Params, Skip
from engine.actions.crm import (
    check_owner_field,
    check_templates,
    check_who,
    crm_table,
    resolve_users,
)
from engine.executor.context import StepContext
from engine.model import Issue

CHANNEL = "crmflow_notifications"


# PostgreSQL refuses a NOTIFY payload of 8000 bytes or more (and the step with it).
MAX_PAYLOAD_BYTES = 7900


def notify_payload(
    ids: list[int], recipient_ids: list[int], entity_type: Any, entity_id: Any, message: str
) -> str:
    """The NOTIFY payload; when it would be too long (a role with many users, a long
    message in a wide alphabet) the lists and the message are cut and ``truncated`` set,
    the counts telling how many there were."""

    def dump(n: int, text: str, truncated: bool) -> str:
        body: dict[str, Any] = {
            "notification_ids": ids[:n],
            "recipient_ids": recipient_ids[:n],
            "entity_type": entity_type,
            "entity_id": entity_id,
            "message": text,
        }
        if truncated:
            body |= {"truncated": True, "count": len(ids)}
        return json.dumps(body, default=str)

    payload = dump(len(ids), message[:1000], False)
    if len(payload.encode()) < MAX_PAYLOAD_BYTES:
        return payload
    return dump(100, message[:200], True)


class SendNotificationParams(Params):
    message: str = Field(min_length=1, max_length=5000)
    recipient: int | str | list[int] = "owner"  # "owner", a user id, ids, "role:<role>"
    owner_field: str = "owner_id"
    # A template: while notifications made under the same key are unread, their message
    # is updated instead of new ones being added.
    dedupe_key: str | None = Field(None, min_length=1, max_length=500)


class SendNotification(Action):
    name = "send_notification"
    Params = SendNotificationParams
    inline = True
    compensable = True
    description = "Notify users in the CRM (notifications table + NOTIFY crmflow_notifications)."

    def check_entity(self, params: Any, entity: Any, path: str) -> list[Issue]:
        issues = check_templates({"message": params.message, "dedupe_key": params.dedupe_key}, path)
        issues += check_who(params.recipient, f"{path}.recipient", "recipient")
        if params.recipient == "owner":
            issues += check_owner_field(
                entity, params.owner_field, f"{path}.recipient", "recipient"
            )
        return issues

    async def run(self, ctx: StepContext, params: Any) -> dict[str, Any]:
        recipients = await resolve_users(ctx, params.recipient, params.owner_field)
        if not recipients:
            raise Skip(f"no recipient: {params.recipient!r} names no user")
        message = ctx.render(params.message) or ""
        conn = ctx.require_conn()
        key = None
        if params.dedupe_key is not None:
            key = dedupe.render_key(ctx, params.dedupe_key)
            await dedupe.lock_keys([ctx], KIND, [key])
            table = crm_table(ctx, "notifications")
            open_ids = await dedupe.open_items(ctx, KIND, key, table, "read_at")
            if open_ids:
                rows = await (
                    await conn.execute(
                        sql.SQL(
                            "WITH before AS (SELECT id, message FROM {t} WHERE id = ANY(%(ids)s))"
                            " UPDATE {t} AS t SET message = %(m)s FROM before AS b"
                            " WHERE t.id = b.id RETURNING t.id, t.recipient_id, b.message"
                        ).format(t=table),
                        {"ids": open_ids, "m": message},
                    )
                ).fetchall()
                await dedupe.remember(ctx, KIND, key, open_ids, updated=True)
                ids = [r["id"] for r in rows]
                recipient_ids = [r["recipient_id"] for r in rows]
                payload = notify_payload(
                    ids, recipient_ids, ctx.execution.get("entity_type"), ctx.entity_id, message
                )
                await conn.execute("SELECT pg_notify(%s, %s)", [CHANNEL, payload])
                return {
                    "notification_ids": ids,
                    "recipient_ids": recipient_ids,
                    "dedupe_key": key,
                    "deduped": True,
                    "previous": {str(r["id"]): r["message"] for r in rows},
                }
        ids = []
        for user in recipients:
            row = await (
                await conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (recipient_id, message, entity_type, entity_id)"
                        " VALUES (%(r)s, %(m)s, %(t)s, %(e)s) RETURNING id"
                    ).format(crm_table(ctx, "notifications")),
                    {
                        "r": user["id"],
                        "m": message,
                        "t": ctx.execution.get("entity_type"),
                        "e": None if ctx.entity_id is None else str(ctx.entity_id),
                    },
                )
            ).fetchone()
            assert row is not None
            ids.append(row["id"])
        payload = notify_payload(
            ids,
            [u["id"] for u in recipients],
            ctx.execution.get("entity_type"),
            ctx.entity_id,
            message,
        )
        await conn.execute("SELECT pg_notify(%s, %s)", [CHANNEL, payload])
        result: dict[str, Any] = {
            "notification_ids": ids,
            "recipient_ids": [u["id"] for u in recipients],
        }
        if key is not None:
            await dedupe.remember(ctx, KIND, key, ids, updated=False)
            result |= {"dedupe_key": key, "deduped": False}
        return result

    async def compensate(self, ctx: StepContext, params: Any, result: dict[str, Any]) -> None:
        previous = result.get("previous")
        if result.get("deduped") and isinstance(previous, dict):  # an update: put it back
            await ctx.require_conn().execute(
                sql.SQL(
                    "UPDATE {} AS t SET message = p.message FROM unnest(%(ids)s::bigint[],"
                    " %(messages)s::text[]) AS p(id, message) WHERE t.id = p.id"
                ).format(crm_table(ctx, "notifications")),
                {"ids": [int(i) for i in previous], "messages": list(previous.values())},
            )
            return
        await ctx.require_conn().execute(
            sql.SQL("DELETE FROM {} WHERE id = ANY(%(ids)s)").format(
                crm_table(ctx, "notifications")
            ),
            {"ids": result.get("notification_ids", [])},
        )


KIND = "notification"

ACTION = SendNotification()
