-- The audit trail of workflows (engine/audit.py, migration 0026).

-- name: workflow_snapshot
-- A workflow's status and current definition before a change, its row locked as the
-- change's UPDATE will lock it (FOR NO KEY UPDATE: enrollments' foreign-key checks on
-- the workflow go on).
SELECT w.id, w.status, w.current_version AS version, v.definition
  FROM crmflow.workflows AS w
  JOIN crmflow.workflow_versions AS v ON v.workflow_id = w.id AND v.version = w.current_version
 WHERE w.id = %(id)s
   FOR NO KEY UPDATE OF w;

-- name: insert_change
INSERT INTO crmflow.workflow_changes (workflow_id, version, actor, action, diff)
VALUES (%(workflow_id)s, %(version)s, %(actor)s, %(action)s, %(diff)s)
RETURNING id, workflow_id, version, actor, at, action, diff;

-- name: list_changes
-- A workflow's changes, oldest first.
SELECT id, workflow_id, version, actor, at, action, diff
  FROM crmflow.workflow_changes
 WHERE workflow_id = %(id)s
 ORDER BY id
 LIMIT %(limit)s;
