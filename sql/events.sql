-- Custom events posted to the API (engine/events.py).

-- name: insert_event
-- A custom event (POST /events/NAME) waits in the outbox like a captured change; the
-- matcher enrolls the workflows whose trigger is an "event" trigger of this name.
INSERT INTO crmflow.outbox (entity_type, op, pk, new_row, event_name, payload, actor)
VALUES (%(entity_type)s, 'event', %(pk)s, %(new_row)s, %(event_name)s, %(payload)s, %(actor)s)
RETURNING id, captured_at;

-- name: wake_matcher
SELECT crmflow.wake_matcher();
