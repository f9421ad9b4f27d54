"""``POST /events/{name}``: custom events for workflows triggered by ``{"type": "event"}``.

When ``CRMFLOW_EVENTS_HMAC_SECRET`` is set, the raw body must also be signed:
``X-Crmflow-Signature: sha256=<hex HMAC-SHA256 of the body with the secret>``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Request, status

from api.deps import Conn, CurrentKey, SettingsDep, by_method
from api.problems import ApiError, problem_responses
from api.schemas import EventIn, EventOut
from engine import events

router = APIRouter(
    prefix="/events",
    tags=["events"],
    dependencies=[Depends(by_method)],
    responses=problem_responses(401, 403, 422, 503),
)

EventName = Annotated[
    str,
    Path(pattern=events.EVENT_NAME_RE.pattern, description="the event's name"),
]


async def check_signature(
    request: Request,
    settings: SettingsDep,
    signature: Annotated[
        str | None,
        Header(
            alias="X-Crmflow-Signature",
            description="sha256=<hex HMAC of the raw body>; required when the server "
            "has an events secret",
        ),
    ] = None,
) -> None:
    secret = settings.events_hmac_secret
    if secret is None:
        return
    body = await request.body()
    if not events.signature_ok(secret.get_secret_value(), body, signature):
        raise ApiError(
            401,
            "the X-Crmflow-Signature header is missing or does not match the body",
            kind="bad-signature",
        )


@router.post(
    "/{name}",
    response_model=EventOut,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Post a custom event",
    dependencies=[Depends(check_signature)],
    responses=problem_responses(400, 413),
)
async def post_event(
    conn: Conn, key: CurrentKey, name: EventName, body: EventIn | None = None
) -> Any:
    """Queues the event for the matcher. With ``entity_type`` and ``entity_id`` it is
    about that entity: its current row is what the workflow's conditions read."""
    body = body or EventIn()
    return await events.ingest(
        conn,
        name,
        payload=body.payload,
        entity_type=body.entity_type,
        entity_id=body.entity_id,
        actor=f"api:{key['name']}",
    )
