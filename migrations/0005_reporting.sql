-- Reporting: per-execution summaries that keep the views fast on long histories, an
-- index by day, and the alerts the engine raises about itself.

-- When the first action succeeded (event -> first action latency) and how long the
-- steps actually ran (execution time without the waits of delays and back-offs).
ALTER TABLE crmflow.executions
    ADD COLUMN first_action_at timestamptz,
    ADD COLUMN active_seconds double precision;

UPDATE crmflow.executions AS x
   SET first_action_at = s.first_done, active_seconds = s.active
  FROM (SELECT execution_id, min(finished_at) FILTER (WHERE status = 'succeeded') AS first_done,
               sum(extract(epoch FROM finished_at - started_at)) AS active
          FROM crmflow.execution_steps GROUP BY execution_id) AS s
 WHERE s.execution_id = x.id;

-- Reports group by day (UTC); the expression is immutable, so it can be indexed.
CREATE INDEX executions_day_idx
    ON crmflow.executions (((triggered_at AT TIME ZONE 'UTC')::date), workflow_id);
CREATE INDEX executions_failed_idx ON crmflow.executions (finished_at) WHERE status = 'failed';

-- Alerts: raised by the worker when a workflow's failure rate or the outbox's age
-- passes its threshold, resolved when it is back under. crmflow watches this table
-- (entity "crmflow_alert"), so workflows deliver alerts like any other event.
CREATE TABLE crmflow.alerts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('failure_rate', 'outbox_age')),
    subject text NOT NULL,          -- the workflow's name, or 'outbox'
    workflow_id bigint REFERENCES crmflow.workflows (id),
    value double precision NOT NULL,
    threshold double precision NOT NULL,
    message text NOT NULL,
    raised_at timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz
);
CREATE UNIQUE INDEX alerts_open_idx ON crmflow.alerts (kind, subject) WHERE resolved_at IS NULL;
