-- crmflow core: watched tables, the outbox, workflows with versions, executions.
-- The runner has already created schema crmflow and crmflow.schema_migrations.

-- One row per table under capture. entity_type is the name workflows use ("lead").
CREATE TABLE crmflow.watched_tables (
    id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entity_type text NOT NULL UNIQUE CHECK (entity_type ~ '^[a-z_][a-z0-9_]{0,62}$'),
    table_schema text NOT NULL,
    table_name text NOT NULL,
    pk_columns text[] NOT NULL CHECK (cardinality(pk_columns) > 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (table_schema, table_name)
);

-- Derived fields: per-entity SQL expressions over a row (whitelisted, column
-- references already qualified with the row alias "n"), usable like columns.
CREATE TABLE crmflow.derived_fields (
    entity_type text NOT NULL REFERENCES crmflow.watched_tables (entity_type)
        ON DELETE CASCADE ON UPDATE CASCADE,
    name text NOT NULL CHECK (name ~ '^[a-z_][a-z0-9_]{0,62}$'),
    expression text NOT NULL,
    source text NOT NULL,
    data_type text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (entity_type, name)
);

-- Single-row state shared by writers and matchers.
--   listening: a matcher is idle and waiting for a NOTIFY; writers only notify then
--              (see crmflow.wake_matcher), so busy periods cost writers no NOTIFY.
--   generation: bumped whenever what the matcher compiles changes (workflows,
--              watched tables, derived fields); matchers reload on a new value.
CREATE TABLE crmflow.matcher_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    listening boolean NOT NULL DEFAULT false,
    generation bigint NOT NULL DEFAULT 0
);
INSERT INTO crmflow.matcher_state DEFAULT VALUES;

-- Every captured change (and every custom event) waiting to be matched, then kept
-- as history until pruned. Claims take pending rows with FOR UPDATE SKIP LOCKED.
CREATE TABLE crmflow.outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entity_type text,            -- NULL for a custom event about no entity
    op text NOT NULL CHECK (op IN ('insert', 'update', 'delete', 'event')),
    pk jsonb,                    -- {"id": 42}; NULL for an event about no entity
    new_row jsonb,               -- insert/update: the row after; event: the entity now
    old_row jsonb,               -- update/delete: the row before
    changed text[],              -- update: columns whose value changed
    event_name text,             -- op = 'event': the custom event's name
    payload jsonb,               -- op = 'event': what was posted
    txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    depth integer NOT NULL DEFAULT 0,  -- 0 for people's writes, n+1 for writes of an action at depth n
    actor text,
    captured_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    processed_at timestamptz,
    matched integer,             -- executions enrolled by this event
    match_error text             -- set when a workflow's predicate failed on this event
);
CREATE INDEX outbox_pending_idx ON crmflow.outbox (id) WHERE processed_at IS NULL;
-- Serves the per-entity order check of the claim (an earlier pending event of the
-- same entity held by another matcher defers ours).
CREATE INDEX outbox_pending_entity_idx ON crmflow.outbox (entity_type, pk, id)
    WHERE processed_at IS NULL;

CREATE TABLE crmflow.workflows (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    status text NOT NULL DEFAULT 'paused' CHECK (status IN ('active', 'paused', 'archived')),
    current_version integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- Names are unique among live workflows; an archived name may be reused.
CREATE UNIQUE INDEX workflows_live_name_idx ON crmflow.workflows (name) WHERE status <> 'archived';

-- Definitions are immutable: a changed definition is a new version, and executions
-- keep the version they started with.
CREATE TABLE crmflow.workflow_versions (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workflow_id bigint NOT NULL REFERENCES crmflow.workflows (id),
    version integer NOT NULL,
    definition jsonb NOT NULL,
    definition_hash text NOT NULL,
    trigger_type text NOT NULL,
    entity_type text,
    priority integer NOT NULL DEFAULT 0,
    -- The definition's limits normalised by the engine (durations in seconds).
    limits jsonb NOT NULL DEFAULT '{}',
    -- The compiled predicate (SQL over the typed rows "n" (new) and "o" (old)):
    -- made by engine.conditions from the definition when it was saved.
    predicate text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workflow_id, version)
);

CREATE FUNCTION crmflow.bump_generation() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    UPDATE crmflow.matcher_state SET generation = generation + 1;
    PERFORM pg_notify('crmflow_workflows', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER tg_workflows__generation
    AFTER INSERT OR UPDATE OR DELETE ON crmflow.workflows
    FOR EACH STATEMENT EXECUTE FUNCTION crmflow.bump_generation();
CREATE TRIGGER tg_watched_tables__generation
    AFTER INSERT OR UPDATE OR DELETE ON crmflow.watched_tables
    FOR EACH STATEMENT EXECUTE FUNCTION crmflow.bump_generation();
CREATE TRIGGER tg_derived_fields__generation
    AFTER INSERT OR UPDATE OR DELETE ON crmflow.derived_fields
    FOR EACH STATEMENT EXECUTE FUNCTION crmflow.bump_generation();

-- One row per enrollment of an entity (or of nothing, for manual runs) in a workflow
-- version. The unique key makes enrollment idempotent: a matcher that crashes after
-- inserting but before committing replays without duplicates.
CREATE TABLE crmflow.executions (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workflow_id bigint NOT NULL REFERENCES crmflow.workflows (id),
    workflow_version_id bigint NOT NULL REFERENCES crmflow.workflow_versions (id),
    workflow_version integer NOT NULL,
    enrollment_key text NOT NULL,   -- 'event:<outbox id>', 'tick:<time>:<pk>', 'manual:<uuid>'
    event_id bigint,
    entity_type text,
    entity_pk jsonb,
    status text NOT NULL DEFAULT 'pending' CHECK (
        status IN ('pending', 'running', 'waiting', 'completed', 'failed', 'cancelled', 'skipped')),
    priority integer NOT NULL DEFAULT 0,
    depth integer NOT NULL DEFAULT 0,
    input jsonb,                    -- manual runs and custom events: what was given
    triggered_at timestamptz NOT NULL,  -- when the triggering write was captured
    not_before timestamptz,         -- debounce or rate limit: do not start earlier
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at timestamptz,
    finished_at timestamptz,
    error text,
    UNIQUE (workflow_version_id, enrollment_key)
);
CREATE INDEX executions_workflow_idx ON crmflow.executions (workflow_id, id DESC);
CREATE INDEX executions_entity_idx ON crmflow.executions (entity_type, entity_pk, id);
CREATE INDEX executions_unfinished_idx ON crmflow.executions (status)
    WHERE status IN ('pending', 'running', 'waiting');
