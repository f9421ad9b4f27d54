"""send_notification: rows in the CRM's ``notifications`` table, plus a NOTIFY.

The NOTIFY goes to the channel ``crmflow_notifications`` with a JSON payload
``{"notification_ids": [...], "recipient_ids": [...], "entity_type", "entity_id",
"message"}`` (message cut to 1,000 characters). It is sent when the step commits.
"""

from __future__ import annotations

import json
from typing import Any

from psycopg import sql
from pydantic import Field

from engine.actions.base import Action, Params
from engine.actions.crm import check_owner_field, check_templates, crm_table, resolve_users
from engine.model import Issue
from engine.runtime import StepContext

CHANNEL = "crmflow_notifications"


class SendNotificationParams(Params):
    message: str = Field(min_length=1, max_length=5000)
    recipient: int | str | list[int] = "owner"  # "owner", a user id, ids, "role:<role>"
    owner_field: str = "owner_id"


class SendNotification(Action):
    name = "send_notification"
    Params = SendNotificationParams
    compensable = True
    description = "Notify users in the CRM (notifications table + NOTIFY crmflow_notifications)."

    def check_entity(self, params: Any, entity: Any, path: str) -> list[Issue]:
        issues = check_templates({"message": params.message}, path)
        if (
            isinstance(params.recipient, str)
            and params.recipient != "owner"
            and not (params.recipient.startswith("role:") and len(params.recipient) > 5)
        ):
            issues.append(
                Issue(
                    f"{path}.recipient",
                    "recipient is 'owner', a user id, a list of ids or 'role:<role>'",
                )
            )
        if params.recipient == "owner":
            issues += check_owner_field(
                entity, params.owner_field, f"{path}.recipient", "recipient"
            )
        return issues

    async def run(self, ctx: StepContext, params: Any) -> dict[str, Any]:
        recipients = await resolve_users(ctx, params.recipient, params.owner_field)
        message = ctx.render(params.message) or ""
        conn = ctx.require_conn()
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
        payload = json.dumps(
            {
                "notification_ids": ids,
                "recipient_ids": [u["id"] for u in recipients],
                "entity_type": ctx.execution.get("entity_type"),
                "entity_id": ctx.entity_id,
                "message": message[:1000],
            },
            default=str,
        )
        await conn.execute("SELECT pg_notify(%s, %s)", [CHANNEL, payload])
        return {"notification_ids": ids, "recipient_ids": [u["id"] for u in recipients]}

    async def compensate(self, ctx: StepContext, params: Any, result: dict[str, Any]) -> None:
        await ctx.require_conn().execute(
            sql.SQL("DELETE FROM {} WHERE id = ANY(%(ids)s)").format(
                crm_table(ctx, "notifications")
            ),
            {"ids": result.get("notification_ids", [])},
        )


ACTION = SendNotification()
