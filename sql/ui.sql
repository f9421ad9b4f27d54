-- The dashboard's queries (/ui, api/routes/ui.py). The live list of executions reads
-- list_executions of queries.sql; everything else reads the reporting views.

-- name: ui_workflows
-- Live workflows with their current version and executions counted by status.
SELECT w.id, w.name, w.status, w.current_version AS version, v.priority, v.trigger_type,
       v.entity_type, coalesce(c.total, 0) AS total, coalesce(c.completed, 0) AS completed,
       coalesce(c.failed, 0) AS failed, coalesce(c.in_progress, 0) AS in_progress,
       coalesce(c.other, 0) AS other, w.broken_reason, w.broken_at, w.broken_since_event_id
  FROM crmflow.workflows AS w
  JOIN crmflow.workflow_versions AS v ON v.workflow_id = w.id AND v.version = w.current_version
  LEFT JOIN LATERAL (
      SELECT count(*) AS total,
             count(*) FILTER (WHERE x.status = 'completed') AS completed,
             count(*) FILTER (WHERE x.status = 'failed') AS failed,
             count(*) FILTER (WHERE x.status IN ('pending', 'running', 'waiting')) AS in_progress,
             count(*) FILTER (WHERE x.status IN ('cancelled', 'skipped')) AS other
        FROM crmflow.executions AS x
       WHERE x.workflow_id = w.id) AS c ON true
 WHERE w.status <> 'archived'
 ORDER BY v.priority DESC, w.id;

-- name: ui_splits
-- Split steps' paths per live workflow (crmflow.split_report), for the workflows page.
SELECT r.workflow_id, r.workflow_name, r.step_id, r.path, r.executions, r.share,
       r.completed, r.failed, r.in_progress, r.success_rate, r.goal_conversions,
       r.goal_conversion_rate
  FROM crmflow.split_report AS r
  JOIN crmflow.workflows AS w ON w.id = r.workflow_id
 WHERE w.status <> 'archived'
 ORDER BY r.workflow_id, r.step_id, r.path;

-- name: ui_workflow_splits
-- One workflow's split steps and their paths, for its page.
SELECT workflow_id, workflow_name, step_id, path, executions, share, completed, failed,
       in_progress, success_rate, goal_conversions, goal_conversion_rate
  FROM crmflow.split_report
 WHERE workflow_id = %(workflow_id)s
 ORDER BY step_id, path;

-- name: ui_failures
-- The newest failed steps (and failed executions that ran none).
SELECT execution_id, workflow_id, workflow_name, workflow_version, entity_type, entity_pk,
       step_id, action, attempts, error, finished_at, execution_status
  FROM crmflow.failures
 ORDER BY finished_at DESC NULLS LAST, execution_id DESC
 LIMIT %(limit)s;

-- name: ui_sla
SELECT metric, target, comparison, value, unit, pass, samples
  FROM crmflow.sla_report;

-- name: ui_latency
-- Per workflow and day over the last %(days)s days (UTC), for the latency chart.
SELECT workflow_id, workflow_name, day, executions, p50_first_action_s, p95_first_action_s,
       p50_duration_s, p95_duration_s
  FROM crmflow.execution_report
 WHERE day > (now() AT TIME ZONE 'UTC')::date - %(days)s::int
 ORDER BY workflow_id, day;

-- name: ui_goal_conversions
-- One workflow's goal conversions over its whole history (crmflow.execution_report).
SELECT coalesce(sum(r.executions), 0) AS executions,
       coalesce(sum(r.goal_conversions), 0) AS goal_conversions,
       coalesce(sum(r.goal_conversions)::numeric / nullif(sum(r.executions), 0), 0)
           AS goal_conversion_rate
  FROM crmflow.execution_report AS r
 WHERE r.workflow_id = %(workflow_id)s;
