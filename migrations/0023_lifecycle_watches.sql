-- Enrollment lifecycle (engine/lifecycle.py, sql/lifecycle.sql): a workflow's "goal" and
-- "exit_when", and the "wait_until" step option.
--
-- goal_met_at: when the enrolled entity met the workflow's goal (the execution then ended
-- "completed", its remaining steps skipped); NULL for every other ending.
ALTER TABLE crmflow.executions ADD COLUMN goal_met_at timestamptz;

-- What the matcher watches for waiting executions: each row says "when this entity
-- changes (or, for a wait on an event, when this custom event about it arrives),
-- evaluate this condition of this execution's workflow version". Written when an
-- execution with a goal, exit criteria or a wait_until step starts waiting; each matcher
-- round joins its claimed events to the rows of their entities (one index probe per
-- event), so the cost is per captured change, never a poll of the waiting executions.
--
-- kind:       'goal' and 'exit' (the workflow's goal and exit_when; step_id ''), 'wait'
--             (step step_id's wait_until: its conditions, or event_name when it waits for
--             a custom event).
-- Rows of finished executions are removed by the round that finds them, and with their
-- execution by retention (ON DELETE CASCADE).
CREATE TABLE crmflow.watches (
    execution_id bigint NOT NULL REFERENCES crmflow.executions (id) ON DELETE CASCADE,
    kind text NOT NULL CHECK (kind IN ('goal', 'exit', 'wait')),
    step_id text NOT NULL DEFAULT '',
    workflow_version_id bigint NOT NULL,
    entity_type text NOT NULL,
    entity_pk jsonb NOT NULL,
    event_name text,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (execution_id, kind, step_id)
);
CREATE INDEX watches_entity_idx ON crmflow.watches (entity_type, entity_pk);
