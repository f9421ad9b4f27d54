-- What /metrics reads at each scrape (engine/metrics.py). Cheap on large histories:
-- the counters come from the outbox's identity sequence and partial indexes.

-- name: events
SELECT (SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END
          FROM crmflow.outbox_id_seq AS s) AS captured,
       lag.backlog AS pending, lag.oldest_age_s AS oldest_age
  FROM crmflow.outbox_lag AS lag;

-- name: executions_by_status
SELECT status, count(*) AS n FROM crmflow.executions GROUP BY status ORDER BY status;

-- name: step_durations
SELECT s.type AS action,
       count(*) AS count,
       sum(extract(epoch FROM s.finished_at - s.started_at)) AS sum,
       ARRAY[count(*) FILTER (WHERE s.finished_at - s.started_at <= interval '0.005 s'),
             count(*) FILTER (WHERE s.finished_at - s.started_at <= interval '0.01 s'),
             count(*) FILTER (WHERE s.finished_at - s.started_at <= interval '0.025 s'),
             count(*) FILTER (WHERE s.finished_at - s.started_at <= interval '0.05 s'),
             count(*) FILTER (WHERE s.finished_at - s.started_at <= interval '0.1 s'),
             count(*) FILTER (WHERE s.finished_at - s.started_at <= interval '0.25 s'),
             count(*) FILTER (WHERE s.finished_at - s.started_at <= interval '0.5 s'),
             count(*) FILTER (WHERE s.finished_at - s.started_at <= interval '1 s'),
             count(*) FILTER (WHERE s.finished_at - s.started_at <= interval '2.5 s'),
             count(*) FILTER (WHERE s.finished_at - s.started_at <= interval '5 s'),
             count(*) FILTER (WHERE s.finished_at - s.started_at <= interval '10 s'),
             count(*) FILTER (WHERE s.finished_at - s.started_at <= interval '30 s'),
             count(*) FILTER (WHERE s.finished_at - s.started_at <= interval '60 s')] AS buckets,
       sum(greatest(s.attempts - 1, 0)) AS retries
  FROM crmflow.execution_steps AS s
 WHERE s.finished_at IS NOT NULL AND s.started_at IS NOT NULL
 GROUP BY s.type ORDER BY s.type;

-- name: worker_heartbeats
SELECT id, hostname, pid, extract(epoch FROM now() - last_heartbeat) AS age
  FROM crmflow.workers
 WHERE stopped_at IS NULL AND last_heartbeat > now() - interval '1 hour'
 ORDER BY id;

-- name: open_alerts
SELECT count(*) AS n FROM crmflow.alerts WHERE resolved_at IS NULL;
