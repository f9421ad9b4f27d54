-- Workflows and their versions (engine/workflows.py).

-- name: lock_workflow_by_name
SELECT id, status FROM crmflow.workflows
 WHERE name = %(name)s AND status <> 'archived'
   FOR UPDATE;

-- name: lock_workflow
SELECT id, status FROM crmflow.workflows WHERE id = %(id)s FOR UPDATE;

-- name: insert_workflow
INSERT INTO crmflow.workflows (name, status)
VALUES (%(name)s, %(status)s)
ON CONFLICT (name) WHERE status <> 'archived' DO NOTHING
RETURNING id, status;

-- name: insert_workflow_version
INSERT INTO crmflow.workflow_versions
       (workflow_id, version, definition, definition_hash, trigger_type, entity_type,
        priority, limits, predicate, capture_filter)
VALUES (%(workflow_id)s, %(version)s, %(definition)s, %(definition_hash)s, %(trigger_type)s,
        %(entity_type)s, %(priority)s, %(limits)s, %(predicate)s, %(capture_filter)s);

-- name: current_version
SELECT v.id, v.version, v.definition_hash, v.predicate, v.capture_filter
  FROM crmflow.workflows AS w
  JOIN crmflow.workflow_versions AS v ON v.workflow_id = w.id AND v.version = w.current_version
 WHERE w.id = %(id)s;

-- name: set_version_capture_filter
UPDATE crmflow.workflow_versions SET capture_filter = %(capture_filter)s WHERE id = %(id)s;

-- name: update_workflow_head
UPDATE crmflow.workflows
   SET name = %(name)s,
       current_version = %(version)s,
       status = coalesce(%(status)s, status),
       updated_at = now()
 WHERE id = %(id)s
RETURNING name, status;

-- name: set_workflow_status
UPDATE crmflow.workflows
   SET status = %(status)s, updated_at = now()
 WHERE id = %(id)s AND (status <> 'archived' OR %(status)s = 'archived')
RETURNING id, name, status;

-- name: list_workflows
SELECT w.id, w.name, w.status,
       (SELECT count(*) FROM crmflow.executions AS x WHERE x.workflow_id = w.id) AS execution_count,
       w.current_version AS version, v.trigger_type, v.entity_type, v.priority,
       w.created_at, w.updated_at, w.broken_reason IS NOT NULL AS broken, w.broken_reason,
       w.broken_at, w.broken_since_event_id
  FROM crmflow.workflows AS w
  JOIN crmflow.workflow_versions AS v ON v.workflow_id = w.id AND v.version = w.current_version
 WHERE %(include_archived)s OR w.status <> 'archived'
 ORDER BY w.id;

-- name: get_workflow
SELECT w.id, w.name, w.status,
       (SELECT count(*) FROM crmflow.executions AS x WHERE x.workflow_id = w.id) AS execution_count,
       w.current_version AS version, v.id AS version_id, v.trigger_type, v.entity_type,
       v.priority, v.definition, v.predicate, w.created_at, w.updated_at,
       w.broken_reason IS NOT NULL AS broken, w.broken_reason, w.broken_at,
       w.broken_since_event_id
  FROM crmflow.workflows AS w
  JOIN crmflow.workflow_versions AS v ON v.workflow_id = w.id AND v.version = w.current_version
 WHERE w.id = %(id)s;

-- name: get_workflow_by_name
SELECT w.id, w.name, w.status,
       (SELECT count(*) FROM crmflow.executions AS x WHERE x.workflow_id = w.id) AS execution_count,
       w.current_version AS version, v.id AS version_id, v.trigger_type, v.entity_type,
       v.priority, v.definition, v.predicate, w.created_at, w.updated_at,
       w.broken_reason IS NOT NULL AS broken, w.broken_reason, w.broken_at,
       w.broken_since_event_id
  FROM crmflow.workflows AS w
  JOIN crmflow.workflow_versions AS v ON v.workflow_id = w.id AND v.version = w.current_version
 WHERE w.name = %(name)s AND w.status <> 'archived';

-- name: list_workflow_versions
SELECT v.id, v.version, v.definition, v.definition_hash, v.trigger_type, v.entity_type,
       v.priority, v.predicate, v.created_at, (v.version = w.current_version) AS current
  FROM crmflow.workflow_versions AS v
  JOIN crmflow.workflows AS w ON w.id = v.workflow_id
 WHERE v.workflow_id = %(id)s
 ORDER BY v.version;
