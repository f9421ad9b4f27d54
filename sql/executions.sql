-- Executions' history for the CLI and the API (engine/executions.py).

-- name: list_executions
-- entity_values (engine.executions.entity_values) become whole keys: {"<key column>":
-- value} for each single-column key column of a watched entity, the object itself for
-- composite keys; compared with = ANY on entity_type and entity_pk, they are looked up
-- in executions_entity_idx (entity_type, entity_pk, id) instead of every execution's
-- key being read (jsonb_each): 161 ms -> 0.1 ms on 100k executions. Without
-- entity_type, the types are the watched ones and those of workflow versions (so
-- executions of a table since unwatched are found too, when its key column is named
-- like a watched one's).
SELECT x.id, x.status, x.triggered_at, x.workflow_id, w.name AS workflow_name,
       x.workflow_version, x.entity_type, x.entity_pk, x.event_id, x.started_at,
       x.finished_at, x.error,
       (SELECT count(*) FROM crmflow.execution_steps AS s
         WHERE s.execution_id = x.id AND s.status = 'succeeded') AS actions_count
  FROM crmflow.executions AS x
  JOIN crmflow.workflows AS w ON w.id = x.workflow_id
 WHERE (%(workflow_id)s::bigint IS NULL OR x.workflow_id = %(workflow_id)s)
   AND (%(status)s::text IS NULL OR x.status = %(status)s)
   AND (%(entity_type)s::text IS NULL OR x.entity_type = %(entity_type)s)
   AND (%(entity_values)s::jsonb IS NULL
        OR (x.entity_type = ANY (ARRAY(
                SELECT %(entity_type)s::text WHERE %(entity_type)s::text IS NOT NULL
                UNION
                SELECT t.entity_type FROM crmflow.watched_tables AS t
                 WHERE %(entity_type)s::text IS NULL
                UNION
                SELECT v.entity_type FROM crmflow.workflow_versions AS v
                 WHERE %(entity_type)s::text IS NULL AND v.entity_type IS NOT NULL))
            AND x.entity_pk = ANY (ARRAY(
                SELECT CASE WHEN cardinality(t.pk_columns) = 1
                            THEN jsonb_build_object(t.pk_columns[1], e.value)
                            ELSE e.value END
                  FROM crmflow.watched_tables AS t,
                       jsonb_array_elements(%(entity_values)s::jsonb) AS e))))
   AND (%(since)s::timestamptz IS NULL OR x.triggered_at >= %(since)s)
   AND (%(until)s::timestamptz IS NULL OR x.triggered_at < %(until)s)
   AND (%(before_id)s::bigint IS NULL OR x.id < %(before_id)s)
 ORDER BY x.id DESC
 LIMIT %(limit)s;

-- name: get_execution
SELECT x.id, x.status, x.triggered_at, x.workflow_id, w.name AS workflow_name,
       x.workflow_version, x.entity_type, x.entity_pk, x.event_id, x.started_at,
       x.finished_at, x.error,
       (SELECT count(*) FROM crmflow.execution_steps AS s
         WHERE s.execution_id = x.id AND s.status = 'succeeded') AS actions_count
  FROM crmflow.executions AS x
  JOIN crmflow.workflows AS w ON w.id = x.workflow_id
 WHERE x.id = %(id)s;

-- name: execution_steps
SELECT step_id, type, status, attempts, scheduled_at, started_at, finished_at, result, error
  FROM crmflow.execution_steps
 WHERE execution_id = %(id)s
 ORDER BY position;
