-- Circuit breakers of the external actions, one row per target host (engine/breakers.py).
-- Each worker counts consecutive failures in memory; the process that sees the count
-- reach CRMFLOW_BREAKER_FAILURES opens the breaker here, and every process (workers, the
-- API's /health, /metrics and dashboard) reads it from here. Rows are written only on
-- transitions, never per call.
--
--   state         closed | open | half_open
--   retry_at      open: when a half-open probe may go; half_open: the probe's deadline
--                 (after it, another process may probe)
--   trips         openings since the breaker last closed (the open period doubles with
--                 each, up to CRMFLOW_BREAKER_MAX_OPEN_SECONDS)
--   failures      the consecutive failures that opened it
--   opened_total  openings ever (the transitions counter of /metrics)
--   probe_owner   the process running the half-open probe
CREATE TABLE crmflow.circuit_breakers (
    host text PRIMARY KEY CHECK (length(host) BETWEEN 1 AND 300),
    state text NOT NULL CHECK (state IN ('closed', 'open', 'half_open')),
    retry_at timestamptz,
    trips integer NOT NULL DEFAULT 0 CHECK (trips >= 0),
    failures integer NOT NULL DEFAULT 0 CHECK (failures >= 0),
    opened_total bigint NOT NULL DEFAULT 0 CHECK (opened_total >= 0),
    last_error text,
    probe_owner text,
    opened_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT circuit_breakers_retry_at_check CHECK (state = 'closed' OR retry_at IS NOT NULL)
);
