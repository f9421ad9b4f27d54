-- API keys of the management API (`crmflow apikey create`, /apikeys). The key is shown
-- once; only the SHA-256 of its secret part is stored. The prefix (public, part of the
-- key) finds the row, and the hash is compared in constant time. Scopes are ordered:
-- read < write < admin.
CREATE TABLE crmflow.api_keys (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    prefix text NOT NULL UNIQUE CHECK (prefix ~ '^[0-9a-f]{12}$'),
    hash text NOT NULL CHECK (hash ~ '^[0-9a-f]{64}$'),
    scope text NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at timestamptz
);
