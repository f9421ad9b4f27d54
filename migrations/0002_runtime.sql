-- The execution runtime: steps and their attempts, schedules, email templates,
-- round-robin assignment state, worker heartbeats.

-- One row per step of an execution, created when the execution starts. A database
-- action's effect commits in the same transaction that marks its step succeeded.
CREATE TABLE crmflow.execution_steps (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    execution_id bigint NOT NULL REFERENCES crmflow.executions (id) ON DELETE CASCADE,
    step_id text NOT NULL,
    position integer NOT NULL,
    type text NOT NULL,
    status text NOT NULL DEFAULT 'pending' CHECK (
        status IN ('pending', 'scheduled', 'running', 'succeeded', 'failed', 'skipped',
                   'compensated')),
    attempts integer NOT NULL DEFAULT 0,
    scheduled_at timestamptz,   -- a delayed step or a retry: not before this
    started_at timestamptz,     -- first attempt
    finished_at timestamptz,
    result jsonb,
    error text,
    UNIQUE (execution_id, step_id)
);
CREATE INDEX execution_steps_failed_idx ON crmflow.execution_steps (finished_at)
    WHERE status = 'failed';

ALTER TABLE crmflow.executions ADD COLUMN replays integer NOT NULL DEFAULT 0;

-- Scheduled and date-relative workflows: when each is due next. Workers claim due
-- rows with FOR UPDATE SKIP LOCKED, so one tick enrolls once however many run.
CREATE TABLE crmflow.schedules (
    workflow_id bigint PRIMARY KEY REFERENCES crmflow.workflows (id) ON DELETE CASCADE,
    workflow_version_id bigint NOT NULL REFERENCES crmflow.workflow_versions (id),
    next_run_at timestamptz NOT NULL,
    last_run_at timestamptz,
    last_enrolled integer
);
CREATE INDEX schedules_due_idx ON crmflow.schedules (next_run_at);

-- Named email templates for send_email (rendered in a sandboxed Jinja2 environment).
CREATE TABLE crmflow.email_templates (
    name text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.-]{1,100}$'),
    subject text NOT NULL,
    body_text text NOT NULL,
    body_html text,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- assign_owner round robin: the last user picked per (workflow, role).
CREATE TABLE crmflow.assignment_cursors (
    workflow_id bigint NOT NULL REFERENCES crmflow.workflows (id) ON DELETE CASCADE,
    pool text NOT NULL,
    last_user text,
    PRIMARY KEY (workflow_id, pool)
);

-- Worker processes and their heartbeats (uptime in the SLA report, /health).
CREATE TABLE crmflow.workers (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    hostname text NOT NULL,
    pid integer NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    last_heartbeat timestamptz NOT NULL DEFAULT now(),
    stopped_at timestamptz
);
CREATE INDEX workers_heartbeat_idx ON crmflow.workers (last_heartbeat);
