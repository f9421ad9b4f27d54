-- Helper functions of the engine, (re)installed by `crmflow migrate` on every run.

-- The procrastinate lock of an execution's step-running jobs: the entity's, so one
-- entity's executions run one at a time in event order ("crmflow:lead:{"id": 42}");
-- an execution about no entity is serialised with itself only.
CREATE OR REPLACE FUNCTION crmflow.execution_lock(entity_type text, pk jsonb, execution_id bigint)
    RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN pk IS NOT NULL THEN 'crmflow:' || entity_type || ':' || pk::text
                ELSE 'crmflow:execution:' || execution_id END
$$;

-- The executor's claim (engine/executor/queue.py): up to "max_rows" due executions, in
-- priority then due order, leased to "worker" for "lease" seconds. An execution is not
-- claimed while another of its entity is leased, or while an earlier one of its entity
-- keeps event order (ordered). Claims are serialised by an advisory lock, taken before
-- the claim's snapshot (a plpgsql statement gets a new one): two workers claiming at the
-- same moment would otherwise each miss the other's fresh leases and could run two
-- executions of one entity side by side. A claim takes a few milliseconds.
-- taken_over: the worker whose lease on it ran out (it died or froze), if any.
DO $$
BEGIN
    -- (a development version returned no taken_over: its result type cannot be replaced)
    IF EXISTS (SELECT 1 FROM pg_proc
                WHERE proname = 'claim_executions' AND pronamespace = 'crmflow'::regnamespace
                  AND pg_get_function_result(oid) NOT LIKE '%taken_over%') THEN
        DROP FUNCTION crmflow.claim_executions(text, integer, double precision);
    END IF;
END
$$;
CREATE OR REPLACE FUNCTION crmflow.claim_executions(worker text, max_rows integer, lease double precision)
    RETURNS TABLE (execution_id bigint, entity_key text, taken_over text)
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('crmflow:executor:claim', 0));
    RETURN QUERY
    WITH due AS (
        SELECT q.execution_id, q.leased_by AS previous
          FROM crmflow.execution_queue AS q
         WHERE q.run_at <= clock_timestamp()
           AND (q.leased_until IS NULL OR q.leased_until < clock_timestamp())
           AND NOT EXISTS (
                   SELECT 1 FROM crmflow.execution_queue AS e
                    WHERE e.entity_key = q.entity_key AND e.execution_id <> q.execution_id
                      AND (e.leased_until >= clock_timestamp()
                           OR (e.ordered AND e.execution_id < q.execution_id)))
         ORDER BY q.priority DESC, q.run_at, q.execution_id
         LIMIT max_rows
           FOR UPDATE OF q SKIP LOCKED)
    UPDATE crmflow.execution_queue AS q
       SET leased_by = worker,
           leased_until = clock_timestamp() + make_interval(secs => lease)
      FROM due
     WHERE q.execution_id = due.execution_id
    RETURNING q.execution_id, q.entity_key, due.previous;
END
$$;
