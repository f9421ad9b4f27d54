-- Reporting views: public surface for BI tools (docs/reporting.md documents every
-- column). Re-created by `crmflow migrate` (DROP + CREATE, so a column change lands).
-- Days are UTC days; durations are in seconds.
DROP VIEW IF EXISTS crmflow.execution_report, crmflow.sla_report, crmflow.failures,
    crmflow.outbox_lag, crmflow.step_report;
DROP VIEW IF EXISTS crmflow.enrollments;
DROP VIEW IF EXISTS crmflow.split_report;

-- The split step's bucket (engine/actions/split.py computes the same in Python): a key's
-- point is the first 32 bits of its MD5; the point modulo the total weight falls in one
-- of the paths' ranges, taken in name order.
CREATE OR REPLACE FUNCTION crmflow.split_point(key text) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ('x' || left(md5(key), 8))::bit(32)::bigint
$$;

CREATE OR REPLACE FUNCTION crmflow.split_path(key text, names text[], weights int[])
    RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p.name
      FROM (SELECT n.name,
                   sum(n.weight) OVER (ORDER BY n.name COLLATE "C") AS upto,
                   sum(n.weight) OVER () AS total
              FROM unnest(names, weights) AS n(name, weight)) AS p
     WHERE crmflow.split_point(key) % p.total < p.upto
     ORDER BY p.upto
     LIMIT 1
$$;

-- Per workflow and day: how many executions, how they ended, how fast.
CREATE VIEW crmflow.execution_report AS
SELECT x.workflow_id,
       w.name AS workflow_name,
       (x.triggered_at AT TIME ZONE 'UTC')::date AS day,
       count(*) AS executions,
       count(*) FILTER (WHERE x.status = 'completed') AS completed,
       count(*) FILTER (WHERE x.status = 'failed') AS failed,
       count(*) FILTER (WHERE x.status = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE x.status = 'skipped') AS skipped,
       count(*) FILTER (WHERE x.status IN ('pending', 'running', 'waiting')) AS in_progress,
       round(count(*) FILTER (WHERE x.status = 'completed')::numeric
             / nullif(count(*) FILTER (WHERE x.status IN ('completed', 'failed')), 0), 4)
           AS success_rate,
       percentile_cont(0.5) WITHIN GROUP (
           ORDER BY extract(epoch FROM x.first_action_at - x.triggered_at)) AS p50_first_action_s,
       percentile_cont(0.95) WITHIN GROUP (
           ORDER BY extract(epoch FROM x.first_action_at - x.triggered_at)) AS p95_first_action_s,
       percentile_cont(0.5) WITHIN GROUP (
           ORDER BY extract(epoch FROM x.finished_at - x.triggered_at)) AS p50_duration_s,
       percentile_cont(0.95) WITHIN GROUP (
           ORDER BY extract(epoch FROM x.finished_at - x.triggered_at)) AS p95_duration_s,
       avg(x.active_seconds) AS avg_active_s,
       -- goal conversions: executions that ended because the entity met the goal
       count(*) FILTER (WHERE x.goal_met_at IS NOT NULL) AS goal_conversions,
       round(count(*) FILTER (WHERE x.goal_met_at IS NOT NULL)::numeric / count(*), 4)
           AS goal_conversion_rate
  FROM crmflow.executions AS x
  JOIN crmflow.workflows AS w ON w.id = x.workflow_id
 GROUP BY x.workflow_id, w.name, (x.triggered_at AT TIME ZONE 'UTC')::date;

-- The seed's success metrics over the last 30 days, from real history.
CREATE VIEW crmflow.sla_report AS
WITH window_ AS (
    SELECT now() - interval '30 days' AS since, now() AS until
), finished AS (
    SELECT count(*) FILTER (WHERE status = 'completed') AS completed,
           count(*) FILTER (WHERE status = 'failed') AS failed,
           avg(active_seconds) AS avg_active
      FROM crmflow.executions, window_
     WHERE triggered_at >= window_.since AND status IN ('completed', 'failed')
), latency AS (
    SELECT percentile_cont(0.95) WITHIN GROUP (
               ORDER BY extract(epoch FROM processed_at - captured_at)) AS p95
      FROM crmflow.outbox, window_
     WHERE captured_at >= window_.since AND processed_at IS NOT NULL
), uptime AS (
    -- A worker is up from its start to its last heartbeat (plus one beat of grace);
    -- uptime is the share of time, since the first worker started in the window, when
    -- at least one was up.
    SELECT sum(upper(r) - lower(r)) AS up, min(lower(r)) AS first_start
      FROM (SELECT unnest(range_agg(tstzrange(greatest(w.started_at, window_.since),
                                              least(w.last_heartbeat + interval '15 seconds',
                                                    window_.until)))) AS r
              FROM crmflow.workers AS w, window_
             WHERE w.last_heartbeat >= window_.since) AS ranges
)
SELECT 'execution_success_rate' AS metric, 0.995::float8 AS target, '>=' AS comparison,
       (completed::float8 / nullif(completed + failed, 0)) AS value, 'ratio' AS unit,
       coalesce(completed::float8 / nullif(completed + failed, 0) >= 0.995, true) AS pass,
       completed + failed AS samples
  FROM finished
UNION ALL
SELECT 'average_execution_time', 5, '<', avg_active, 'seconds',
       coalesce(avg_active < 5, true), completed + failed
  FROM finished
UNION ALL
SELECT 'event_processing_latency_p95', 1, '<', p95, 'seconds', coalesce(p95 < 1, true), NULL
  FROM latency
UNION ALL
SELECT 'worker_uptime', 0.999, '>=',
       extract(epoch FROM up) / nullif(extract(epoch FROM now() - first_start), 0), 'ratio',
       coalesce(extract(epoch FROM up) / nullif(extract(epoch FROM now() - first_start), 0)
                >= 0.999, true), NULL
  FROM uptime;

-- Failed steps with their error (and failed executions that never ran a step, like
-- chains stopped by the depth limit), newest first when ordered by finished_at.
CREATE VIEW crmflow.failures AS
SELECT x.id AS execution_id, x.workflow_id, w.name AS workflow_name, x.workflow_version,
       x.entity_type, x.entity_pk, s.step_id, s.type AS action, s.attempts, s.error,
       s.finished_at, x.triggered_at, x.status AS execution_status
  FROM crmflow.execution_steps AS s
  JOIN crmflow.executions AS x ON x.id = s.execution_id
  JOIN crmflow.workflows AS w ON w.id = x.workflow_id
 WHERE s.status = 'failed'
UNION ALL
SELECT x.id, x.workflow_id, w.name, x.workflow_version, x.entity_type, x.entity_pk,
       NULL, NULL, 0, x.error, x.finished_at, x.triggered_at, x.status
  FROM crmflow.executions AS x
  JOIN crmflow.workflows AS w ON w.id = x.workflow_id
 WHERE x.status = 'failed'
   AND NOT EXISTS (SELECT 1 FROM crmflow.execution_steps AS s
                    WHERE s.execution_id = x.id AND s.status = 'failed');

-- The matcher's backlog: events captured but not matched yet.
CREATE VIEW crmflow.outbox_lag AS
SELECT count(*) AS backlog,
       min(captured_at) AS oldest_captured_at,
       coalesce(extract(epoch FROM now() - min(captured_at)), 0) AS oldest_age_s
  FROM crmflow.outbox
 WHERE processed_at IS NULL;

-- Per action type: how steps ended, how long they ran, how often they were retried.
CREATE VIEW crmflow.step_report AS
SELECT s.type AS action,
       count(*) AS steps,
       count(*) FILTER (WHERE s.status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE s.status = 'failed') AS failed,
       count(*) FILTER (WHERE s.status = 'skipped') AS skipped,
       count(*) FILTER (WHERE s.status = 'compensated') AS compensated,
       count(*) FILTER (WHERE s.status IN ('pending', 'scheduled', 'running')) AS in_progress,
       round(count(*) FILTER (WHERE s.status = 'succeeded')::numeric
             / nullif(count(*) FILTER (WHERE s.status IN ('succeeded', 'failed')), 0), 4)
           AS success_rate,
       percentile_cont(0.5) WITHIN GROUP (
           ORDER BY extract(epoch FROM s.finished_at - s.started_at)) AS p50_duration_s,
       percentile_cont(0.95) WITHIN GROUP (
           ORDER BY extract(epoch FROM s.finished_at - s.started_at)) AS p95_duration_s,
       sum(greatest(s.attempts - 1, 0)) AS retries
  FROM crmflow.execution_steps AS s
 GROUP BY s.type;

-- Per workflow, split step and path: how many executions took the path and how they
-- ended (the path is the split step's result; executions whose split has not run yet
-- are not counted).
CREATE VIEW crmflow.split_report AS
SELECT x.workflow_id,
       w.name AS workflow_name,
       s.step_id,
       s.result ->> 'path' AS path,
       count(*) AS executions,
       count(*) FILTER (WHERE x.status = 'completed') AS completed,
       count(*) FILTER (WHERE x.status = 'failed') AS failed,
       count(*) FILTER (WHERE x.status = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE x.status IN ('pending', 'running', 'waiting')) AS in_progress,
       round(count(*)::numeric / sum(count(*)) OVER (PARTITION BY x.workflow_id, s.step_id), 4)
           AS share,
       round(count(*) FILTER (WHERE x.status = 'completed')::numeric
             / nullif(count(*) FILTER (WHERE x.status IN ('completed', 'failed')), 0), 4)
           AS success_rate,
       -- the A/B measure: executions of the path that ended because the entity met the
       -- workflow's goal
       count(*) FILTER (WHERE x.goal_met_at IS NOT NULL) AS goal_conversions,
       round(count(*) FILTER (WHERE x.goal_met_at IS NOT NULL)::numeric / count(*), 4)
           AS goal_conversion_rate,
       min(s.finished_at) AS first_at,
       max(s.finished_at) AS last_at
  FROM crmflow.execution_steps AS s
  JOIN crmflow.executions AS x ON x.id = s.execution_id
  JOIN crmflow.workflows AS w ON w.id = x.workflow_id
 WHERE s.type = 'split' AND s.status = 'succeeded'
 GROUP BY x.workflow_id, w.name, s.step_id, s.result ->> 'path';

-- Enrollments (engine/lifecycle.py): one row per execution, in the words of a CRM's
-- enrollment list. state: active (pending or running), waiting (a delay, a wait_until,
-- a retry), completed, goal_met (completed because the entity met the goal), exited
-- (cancelled: exit criteria or by hand; or skipped), failed. current_step: the step
-- running, else the next one due; waiting_until: when a waiting enrollment is due again.
CREATE VIEW crmflow.enrollments AS
SELECT x.id AS execution_id,
       x.workflow_id,
       w.name AS workflow_name,
       x.workflow_version,
       x.entity_type,
       x.entity_pk,
       CASE WHEN jsonb_typeof(x.entity_pk) = 'object' AND (SELECT count(*) FROM jsonb_object_keys(x.entity_pk)) = 1
            THEN (SELECT v FROM jsonb_each(x.entity_pk) AS e(k, v)) END AS entity_id,
       CASE WHEN x.status IN ('pending', 'running') THEN 'active'
            WHEN x.status = 'waiting' THEN 'waiting'
            WHEN x.status = 'completed' AND x.goal_met_at IS NOT NULL THEN 'goal_met'
            WHEN x.status = 'completed' THEN 'completed'
            WHEN x.status IN ('cancelled', 'skipped') THEN 'exited'
            ELSE 'failed' END AS state,
       cur.step_id AS current_step,
       CASE WHEN x.status = 'waiting' OR x.not_before IS NOT NULL
            THEN coalesce(x.not_before, cur.scheduled_at) END AS waiting_until,
       x.triggered_at AS enrolled_at,
       x.finished_at,
       x.goal_met_at,
       x.error AS reason
  FROM crmflow.executions AS x
  JOIN crmflow.workflows AS w ON w.id = x.workflow_id
  LEFT JOIN LATERAL (
        SELECT s.step_id, s.scheduled_at
          FROM crmflow.execution_steps AS s
         WHERE s.execution_id = x.id AND s.status IN ('running', 'scheduled', 'pending')
         ORDER BY s.status = 'running' DESC, s.status = 'scheduled' DESC, s.scheduled_at,
                  s.position
         LIMIT 1) AS cur ON x.status IN ('pending', 'running', 'waiting');
