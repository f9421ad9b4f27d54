-- The API's health checks (api/routes/health.py): live workers and the outbox's backlog.

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
