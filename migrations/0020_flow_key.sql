-- Per-key flow control (limits.key, engine/executor/flow.py): the key an execution's
-- limits count under, rendered from the workflow's template when it starts ("the
-- account", "the target host"); NULL: the workflow's one key. The index serves the
-- count of running executions per workflow and key.
ALTER TABLE crmflow.executions ADD COLUMN flow_key text;

CREATE INDEX executions_running_idx ON crmflow.executions (workflow_id, flow_key)
    WHERE status = 'running';
