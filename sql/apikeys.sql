-- API keys and the dashboard's sessions (engine/apikeys.py).

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
