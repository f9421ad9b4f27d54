-- Suppression lists, dedupe keys of open work items, per-environment event queues
-- (docs/workflows.md: "suppress", "dedupe_key", "environment"; docs/operations.md).

-- Suppression lists: an entry names an entity (entity_type + its key, as the outbox
-- records keys: {"id": 5}) or an email address, on a named list. A workflow's
-- "suppress": [lists] keeps listed entities (and entities whose "email" column holds a
-- listed address) from enrolling; send_email never sends to an address on the list
-- "unsubscribed". An entry with an "until" in the past no longer suppresses.
CREATE TABLE crmflow.suppressions (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    list text NOT NULL CONSTRAINT suppressions_list_name
        CHECK (list ~ '^[A-Za-z0-9_.:-]{1,100}$'),
    entity_type text,
    entity_key jsonb,
    email text CONSTRAINT suppressions_email_length CHECK (length(email) <= 320),
    reason text CONSTRAINT suppressions_reason_length CHECK (length(reason) <= 1000),
    until timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    who text,
    CONSTRAINT suppressions_target CHECK (
        (entity_type IS NOT NULL AND entity_key IS NOT NULL AND email IS NULL)
        OR (entity_type IS NULL AND entity_key IS NULL AND email IS NOT NULL))
);
CREATE UNIQUE INDEX suppressions_entity_idx
    ON crmflow.suppressions (list, entity_type, entity_key) WHERE email IS NULL;
CREATE UNIQUE INDEX suppressions_email_idx
    ON crmflow.suppressions (list, lower(email)) WHERE email IS NOT NULL;

-- Whether an entity is on one of these lists now (by its key, or by the address in its
-- row's "email" field). The matcher inlines the same test as a NOT EXISTS
-- (sql/suppressions.sql); this function is for the other enrollment paths and for SQL
-- users.
CREATE FUNCTION crmflow.is_suppressed(lists text[], entity_type text, entity_key jsonb,
                                      entity_row jsonb DEFAULT NULL)
RETURNS boolean LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT EXISTS (
        SELECT 1 FROM crmflow.suppressions AS s
         WHERE s.list = ANY (lists)
           AND (s.until IS NULL OR s.until > now())
           AND ((s.email IS NULL AND s.entity_type = is_suppressed.entity_type
                 AND s.entity_key = is_suppressed.entity_key)
                OR (s.email IS NOT NULL AND entity_row ->> 'email' IS NOT NULL
                    AND lower(s.email) = lower(entity_row ->> 'email'))))
$$;

-- Dedupe keys of open work items (create_task / send_notification "dedupe_key"): which
-- CRM rows a rendered key made, so a later step with the same key updates them while
-- they are open (a task not completed, a notification not read) instead of adding
-- another. crmflow's bookkeeping: the CRM's tables get no column. The primary key
-- serialises concurrent steps with the same key (the second waits for the first).
CREATE TABLE crmflow.dedupe_keys (
    kind text NOT NULL,
    dedupe_key text NOT NULL CONSTRAINT dedupe_keys_key_length CHECK (length(dedupe_key) <= 500),
    item_ids bigint[] NOT NULL DEFAULT '{}',
    workflow_id bigint,
    execution_id bigint,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    updates integer NOT NULL DEFAULT 0,
    PRIMARY KEY (kind, dedupe_key)
);

-- Events for the workflows of other environments. A matcher claims outbox events for
-- every workflow but enrolls only its own environment's; in the same transaction it
-- queues the events that other environments' active workflows watch here, one row per
-- (environment, event), and the matchers of that environment claim them from here
-- (FOR UPDATE SKIP LOCKED, as the outbox). Empty while every workflow is of one
-- environment.
CREATE TABLE crmflow.environment_events (
    environment text NOT NULL,
    event_id bigint NOT NULL,
    queued_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (environment, event_id)
);
