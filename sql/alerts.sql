-- Alerts the engine raises about itself (engine/alerts.py). Rows in crmflow.alerts are
-- captured like any CRM write (entity "crmflow_alert"): workflows deliver them.

-- name: lock_alert_check
-- One worker checks at a time.
SELECT pg_try_advisory_xact_lock(hashtextextended('crmflow:alerts', 0)) AS mine;

-- name: failure_rates
-- Finished executions per active workflow in the window.
SELECT w.id AS workflow_id, w.name,
       count(*) FILTER (WHERE x.status = 'failed') AS failed,
       count(*) AS finished
  FROM crmflow.executions AS x
  JOIN crmflow.workflows AS w ON w.id = x.workflow_id
 WHERE x.finished_at > now() - make_interval(secs => %(window)s)
   AND x.status IN ('completed', 'failed')
 GROUP BY w.id, w.name;

-- name: outbox_age
SELECT oldest_age_s AS age FROM crmflow.outbox_lag;

-- name: raise_alert
-- At most one open alert per kind and subject: raising again while open does nothing.
INSERT INTO crmflow.alerts (kind, subject, workflow_id, value, threshold, message)
VALUES (%(kind)s, %(subject)s, %(workflow_id)s, %(value)s, %(threshold)s, %(message)s)
ON CONFLICT (kind, subject) WHERE resolved_at IS NULL DO NOTHING
RETURNING id;

-- name: resolve_alert
UPDATE crmflow.alerts SET resolved_at = now()
 WHERE kind = %(kind)s AND subject = %(subject)s AND resolved_at IS NULL
RETURNING id;

-- name: open_alerts
SELECT id, kind, subject, workflow_id, value, threshold, message, raised_at
  FROM crmflow.alerts WHERE resolved_at IS NULL ORDER BY raised_at;
