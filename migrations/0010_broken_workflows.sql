-- Schema drift isolates (docs/design.md). A workflow whose compiled predicate no longer
-- compiles against the catalog (a column dropped or renamed, a type changed or renamed,
-- its table renamed or dropped) is left out of the match statement and marked broken
-- here, instead of failing the statement for every event of every workflow.
--
--   broken_reason          why it does not compile (NULL: it compiles)
--   broken_at              when the matcher (or a save) first saw it broken
--   broken_since_event_id  the first outbox event it may have missed; kept after the
--                          workflow compiles again, until `crmflow workflow
--                          replay-events` re-matches it over its entity's events since
ALTER TABLE crmflow.workflows
    ADD COLUMN broken_reason text,
    ADD COLUMN broken_at timestamptz,
    ADD COLUMN broken_since_event_id bigint;

-- An alert kind of its own, raised when a workflow is found broken and resolved when it
-- compiles again (engine/alerts.py; the alert workflow delivers it).
ALTER TABLE crmflow.alerts DROP CONSTRAINT alerts_kind_check;
ALTER TABLE crmflow.alerts ADD CONSTRAINT alerts_kind_check
    CHECK (kind IN ('failure_rate', 'outbox_age', 'workflow_broken'));
