-- The management API's SQL: API keys, custom events, dry runs and health
-- (engine/apikeys.py, engine/events.py, engine/dryrun.py, api/routes/health.py).
-- Blocks with {placeholders} are templates completed with psycopg.sql.

-- ───────────────────────────── API keys ─────────────────────────────

-- name: insert_api_key
INSERT INTO crmflow.api_keys (name, prefix, hash, scope)
VALUES (%(name)s, %(prefix)s, %(hash)s, %(scope)s)
ON CONFLICT (prefix) DO NOTHING
RETURNING id, name, prefix, scope, created_at, last_used_at, revoked_at;

-- name: api_key_by_prefix
SELECT id, name, prefix, hash, scope, created_at, last_used_at, revoked_at
  FROM crmflow.api_keys
 WHERE prefix = %(prefix)s;

-- name: touch_api_key
-- At most one write a minute per key: a busy client does not turn reads into writes.
UPDATE crmflow.api_keys
   SET last_used_at = now()
 WHERE id = %(id)s AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute');

-- name: list_api_keys
SELECT id, name, prefix, scope, created_at, last_used_at, revoked_at
  FROM crmflow.api_keys
 WHERE %(include_revoked)s OR revoked_at IS NULL
 ORDER BY id;

-- name: revoke_api_key
-- The key's dashboard sessions end with it.
WITH revoked AS (
    UPDATE crmflow.api_keys SET revoked_at = now()
     WHERE id = %(id)s AND revoked_at IS NULL
    RETURNING id
), sessions_ended AS (
    DELETE FROM crmflow.ui_sessions WHERE api_key_id = %(id)s
)
SELECT id, name, prefix, scope, created_at, last_used_at,
       coalesce(revoked_at, now()) AS revoked_at
  FROM crmflow.api_keys
 WHERE id = %(id)s;

-- ───────────────────────────── dashboard sessions ─────────────────────────────

-- name: insert_ui_session
-- A login at /ui: the token's SHA-256, its key, its end. Expired sessions go meanwhile.
WITH expired AS (
    DELETE FROM crmflow.ui_sessions WHERE expires_at <= now()
)
INSERT INTO crmflow.ui_sessions (token_hash, api_key_id, expires_at)
VALUES (%(hash)s, %(api_key_id)s, now() + make_interval(secs => %(ttl)s))
RETURNING id, created_at, expires_at;

-- name: ui_session_key
-- The key of a live session: not expired, its key not revoked.
SELECT k.id, k.name, k.prefix, k.scope, k.created_at, k.last_used_at, k.revoked_at,
       s.id AS session_id, s.expires_at AS session_expires_at
  FROM crmflow.ui_sessions AS s
  JOIN crmflow.api_keys AS k ON k.id = s.api_key_id
 WHERE s.token_hash = %(hash)s AND s.expires_at > now() AND k.revoked_at IS NULL;

-- name: delete_ui_session
DELETE FROM crmflow.ui_sessions WHERE token_hash = %(hash)s;

-- ───────────────────────────── entities and events ─────────────────────────────

-- name: insert_event
-- A custom event (POST /events/NAME) waits in the outbox like a captured change; the
-- matcher enrolls the workflows whose trigger is an "event" trigger of this name.
INSERT INTO crmflow.outbox (entity_type, op, pk, new_row, event_name, payload, actor)
VALUES (%(entity_type)s, 'event', %(pk)s, %(new_row)s, %(event_name)s, %(payload)s, %(actor)s)
RETURNING id, captured_at;

-- name: wake_matcher
SELECT crmflow.wake_matcher();

-- ───────────────────────────── dry run ─────────────────────────────

-- name: dry_run
-- The stored predicate and each top-level condition evaluated on one simulated event:
-- ev is a crmflow.outbox row built from JSON, n and o the typed rows the matcher
-- would build from it.
SELECT {columns}, to_jsonb(n) AS evaluated_row
  FROM jsonb_populate_record(NULL::crmflow.outbox, %(event)s::jsonb) AS ev
 CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, coalesce(ev.new_row, ev.old_row)) AS n
 CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, ev.old_row) AS o;

-- name: dry_run_no_entity
SELECT {columns}, NULL::jsonb AS evaluated_row
  FROM jsonb_populate_record(NULL::crmflow.outbox, %(event)s::jsonb) AS ev;

-- ───────────────────────────── health ─────────────────────────────

-- name: health_workers
-- Workers that heartbeat within the stalled-worker timeout are alive.
SELECT count(*) FILTER (WHERE stopped_at IS NULL
                          AND last_heartbeat > now() - make_interval(secs => %(timeout)s))
           AS alive,
       max(last_heartbeat) AS last_heartbeat,
       extract(epoch FROM now() - max(last_heartbeat))::float8 AS last_heartbeat_age
  FROM crmflow.workers;

-- name: health_outbox
SELECT count(*) AS pending,
       extract(epoch FROM clock_timestamp() - min(captured_at))::float8 AS oldest_age
  FROM crmflow.outbox
 WHERE processed_at IS NULL;
