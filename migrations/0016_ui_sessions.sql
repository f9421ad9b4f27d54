-- Dashboard sessions (api/routes/ui.py). Logging in at /ui with an API key makes a
-- session: the browser's cookie holds a random token (secrets.token_urlsafe), stored
-- here only as its SHA-256, so a leaked cookie is no API key and a leaked table is no
-- cookie. "Log out" deletes the row; revoking the key deletes its sessions (and a
-- session of a revoked key is refused at lookup); deleting the key cascades. Sessions
-- expire at expires_at (CRMFLOW_UI_SESSION_TTL after login); expired rows are deleted
-- at the next login.
CREATE TABLE crmflow.ui_sessions (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token_hash text NOT NULL UNIQUE CHECK (token_hash ~ '^[0-9a-f]{64}$'),
    api_key_id bigint NOT NULL REFERENCES crmflow.api_keys (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX ui_sessions_api_key_id_idx ON crmflow.ui_sessions (api_key_id);
CREATE INDEX ui_sessions_expires_at_idx ON crmflow.ui_sessions (expires_at);
