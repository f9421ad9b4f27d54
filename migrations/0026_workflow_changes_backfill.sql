-- The audit trail of workflows (engine/audit.py): one row per create, new version,
-- activation, pause and archive, written in the transaction of the change itself.
-- actor: the API key's name through the API, the OS user through the CLI, or what the
-- caller named. diff: the changed paths of the definition (status included), each with
-- its value before and after: [{"path": "conditions[0].value", "before": .., "after": ..}].
CREATE TABLE crmflow.workflow_changes (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workflow_id bigint NOT NULL REFERENCES crmflow.workflows (id),
    version integer NOT NULL,
    actor text NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    action text NOT NULL
        CHECK (action IN ('create', 'update', 'activate', 'pause', 'archive')),
    diff jsonb NOT NULL DEFAULT '[]'
);

CREATE INDEX workflow_changes_workflow_idx ON crmflow.workflow_changes (workflow_id, id);

-- Backfill (engine/backfill.py) enrolls each existing row of a workflow once, whatever
-- the version: its executions' key is 'backfill:<pk>', unique per workflow. Partial, so
-- the other enrollments (events, ticks, manual runs) do not pay for it.
CREATE UNIQUE INDEX executions_backfill_key ON crmflow.executions (workflow_id, enrollment_key)
    WHERE enrollment_key LIKE 'backfill:%';
