-- Scorecards (docs/scorecards.md): versioned definitions that score an entity from its
-- row and from aggregates over related tables, set-based in SQL (engine/scorecards/).
--
--   scorecard_relations  a related table's rows belong to an entity by a key column
--       (`crmflow relation add`); aggregates read it, joined by the engine.
--   scorecards / scorecard_versions  like workflows: a changed definition is a new
--       version; columns_read are the entity's columns the version reads (a write to
--       one of them rescores the entity in real time).
--   score_sources  which captured entities rescore which scorecard in real time (the
--       entity's own table and its related tables); kept by `score apply`. A change
--       bumps the matcher's generation: the matcher notes the keys of the events it
--       claims for these sources into score_queue, in its own transaction.
--   score_queue  entities waiting for a real-time rescore (drained by the worker).
--   score_latest  each entity's current score per scorecard; `pending` marks the rows
--       whose values are not yet written to the entity's columns.
--   score_history  one row per entity and run whose score or level changed.
CREATE TABLE crmflow.scorecard_relations (
    entity_type text NOT NULL,
    name text NOT NULL CHECK (name ~ '^[a-z_][a-z0-9_]{0,62}$'),
    related_entity_type text NOT NULL,
    key_column text NOT NULL,
    time_column text,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (entity_type, name)
);

CREATE TABLE crmflow.scorecards (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    entity_type text NOT NULL,
    status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused')),
    current_version integer NOT NULL DEFAULT 1,
    schedule text,
    realtime boolean NOT NULL DEFAULT false,
    next_run_at timestamptz,
    last_run_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE crmflow.scorecard_versions (
    scorecard_id bigint NOT NULL REFERENCES crmflow.scorecards (id) ON DELETE CASCADE,
    version integer NOT NULL,
    definition jsonb NOT NULL,
    definition_hash text NOT NULL,
    columns_read text[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scorecard_id, version)
);

CREATE TABLE crmflow.score_sources (
    scorecard_id bigint NOT NULL REFERENCES crmflow.scorecards (id) ON DELETE CASCADE,
    source_entity text NOT NULL,
    -- NULL: the source is the entity's own table (the event's key is the entity's key);
    -- else the related table's column holding the entity's key.
    key_column text,
    -- The entity's key column (the key object's member) for related sources.
    entity_key_column text,
    -- Own table: an update rescores when one of these changed (NULL: any update).
    columns text[],
    PRIMARY KEY (scorecard_id, source_entity)
);
CREATE TRIGGER tg_score_sources__generation
    AFTER INSERT OR UPDATE OR DELETE ON crmflow.score_sources
    FOR EACH STATEMENT EXECUTE FUNCTION crmflow.bump_generation();

CREATE TABLE crmflow.score_queue (
    scorecard_id bigint NOT NULL REFERENCES crmflow.scorecards (id) ON DELETE CASCADE,
    entity_key jsonb NOT NULL,
    queued_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scorecard_id, entity_key)
);

CREATE TABLE crmflow.score_latest (
    scorecard_id bigint NOT NULL REFERENCES crmflow.scorecards (id) ON DELETE CASCADE,
    entity_key jsonb NOT NULL,
    version integer NOT NULL,
    segment text NOT NULL,
    score double precision NOT NULL,
    level text NOT NULL,
    lp double precision NOT NULL,
    factors jsonb NOT NULL,
    days_to_event double precision,
    pending boolean NOT NULL DEFAULT false,
    scored_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scorecard_id, entity_key)
);
CREATE INDEX score_latest_pending_idx ON crmflow.score_latest (scorecard_id, entity_key)
    WHERE pending;

CREATE TABLE crmflow.score_history (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entity_type text NOT NULL,
    entity_key jsonb NOT NULL,
    scorecard_id bigint NOT NULL REFERENCES crmflow.scorecards (id) ON DELETE CASCADE,
    version integer NOT NULL,
    score double precision NOT NULL,
    previous_score double precision,
    change double precision,
    level text NOT NULL,
    previous_level text,
    contributions jsonb NOT NULL,
    scored_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX score_history_entity_idx
    ON crmflow.score_history (scorecard_id, entity_key, scored_at);
CREATE INDEX score_history_time_idx ON crmflow.score_history (scored_at);
