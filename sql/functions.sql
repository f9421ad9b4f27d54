-- Helper functions of the engine, (re)installed by `crmflow migrate`.

-- name: install
-- The procrastinate lock of an execution's step-running jobs: the entity's, so one
-- entity's executions run one at a time in event order ("crmflow:lead:{"id": 42}");
-- an execution about no entity is serialised with itself only.
CREATE OR REPLACE FUNCTION crmflow.execution_lock(entity_type text, pk jsonb, execution_id bigint)
    RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN pk IS NOT NULL THEN 'crmflow:' || entity_type || ':' || pk::text
                ELSE 'crmflow:execution:' || execution_id END
$$;
