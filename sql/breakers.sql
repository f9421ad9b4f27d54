-- Circuit breakers of the external actions (engine/breakers.py): written on transitions
-- only (open, half-open probe, close), read by each worker at most once a second.
-- Times come from the worker (%(now)s), the clock its admit() compares with.

-- name: breakers_not_closed
SELECT host, state, retry_at, trips, probe_owner
  FROM crmflow.circuit_breakers
 WHERE state <> 'closed';

-- name: breaker_get
SELECT host, state, retry_at, trips, probe_owner
  FROM crmflow.circuit_breakers
 WHERE host = %(host)s;

-- name: breaker_open
-- This process counted %(failures)s consecutive failures: open the breaker, unless
-- another process did already (then the row as it is).
INSERT INTO crmflow.circuit_breakers AS b
       (host, state, retry_at, trips, failures, opened_total, last_error, opened_at,
        updated_at)
VALUES (%(host)s, 'open', %(now)s + make_interval(secs => %(open_seconds)s), 1,
        %(failures)s, 1, %(error)s, %(now)s, %(now)s)
ON CONFLICT (host) DO UPDATE
   SET state = 'open', retry_at = excluded.retry_at, trips = 1,
       failures = excluded.failures, opened_total = b.opened_total + 1,
       last_error = excluded.last_error, probe_owner = NULL, opened_at = excluded.opened_at,
       updated_at = excluded.updated_at
 WHERE b.state = 'closed'
RETURNING host, state, retry_at, trips, probe_owner;

-- name: breaker_claim_probe
-- Become the half-open probe: the breaker's open period is over (or the last probe's
-- deadline passed, its process gone). One process wins; the others keep waiting.
UPDATE crmflow.circuit_breakers
   SET state = 'half_open', retry_at = %(now)s + make_interval(secs => %(probe_timeout)s),
       probe_owner = %(owner)s, updated_at = %(now)s
 WHERE host = %(host)s AND state <> 'closed' AND retry_at <= %(now)s
RETURNING host, state, retry_at, trips, probe_owner;

-- name: breaker_reopen
-- The probe failed: open again, for twice the last period (at most the cap).
UPDATE crmflow.circuit_breakers
   SET state = 'open', trips = trips + 1, opened_total = opened_total + 1,
       retry_at = %(now)s + make_interval(
           secs => least(%(open_seconds)s * power(2, least(trips, 30)), %(max_open_seconds)s)),
       last_error = %(error)s, probe_owner = NULL, opened_at = %(now)s, updated_at = %(now)s
 WHERE host = %(host)s AND state = 'half_open' AND probe_owner = %(owner)s
RETURNING host, state, retry_at, trips, probe_owner;

-- name: breaker_release_probe
-- The probe made no call (skipped, cancelled): the next caller may probe at once.
UPDATE crmflow.circuit_breakers
   SET state = 'open', retry_at = %(now)s, probe_owner = NULL, updated_at = %(now)s
 WHERE host = %(host)s AND state = 'half_open' AND probe_owner = %(owner)s
RETURNING host, state, retry_at, trips, probe_owner;

-- name: breaker_close
-- A call succeeded: closed (for every process, at its next read).
UPDATE crmflow.circuit_breakers
   SET state = 'closed', retry_at = NULL, trips = 0, failures = 0, probe_owner = NULL,
       updated_at = %(now)s
 WHERE host = %(host)s AND state <> 'closed'
RETURNING host, state, retry_at, trips, probe_owner;

-- name: breakers_list
-- For /health, /metrics and the dashboard: every breaker, the not-closed ones first.
SELECT host, state, retry_at, trips, failures, opened_total, last_error, opened_at,
       updated_at
  FROM crmflow.circuit_breakers
 ORDER BY state = 'closed', host;
