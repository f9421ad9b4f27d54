-- Capture demands and column pruning (docs/design.md, "Capture keeps what can match").
--
--   capture_demands  what other parts of crmflow need captured whatever the workflows
--       say (the scorecards' signal tables: logins, feature usage): a demanded
--       (entity, operation) keeps every row; `columns` are the columns it reads (NULL:
--       all of them). Written with engine/prefilter.py's set_capture_demand and
--       drop_capture_demand, which regenerate the entity's capture in the same
--       transaction (the row triggers below do it at commit for any other write). A
--       demand on an entity not watched (yet) does nothing until it is.
--   watched_tables.capture_all_columns  keep every column of the table's captured rows,
--       whatever the workflows read (`crmflow watch TABLE --all-columns`, for audit
--       users); otherwise capture keeps the key and the columns the active workflows,
--       derived fields and demands read.
CREATE TABLE crmflow.capture_demands (
    demand      text NOT NULL CHECK (length(demand) BETWEEN 1 AND 200),
    entity_type text NOT NULL,
    operation   text NOT NULL CHECK (operation IN ('insert', 'update', 'delete')),
    columns     text[] NULL,  -- NULL: all columns
    PRIMARY KEY (demand, entity_type, operation)
);

ALTER TABLE crmflow.watched_tables ADD COLUMN capture_all_columns boolean NOT NULL DEFAULT false;

CREATE TRIGGER tg_capture_demands__capture_change
    AFTER INSERT OR UPDATE OR DELETE ON crmflow.capture_demands
    FOR EACH ROW EXECUTE FUNCTION crmflow.note_capture_change();
CREATE CONSTRAINT TRIGGER tg_capture_demands__capture_refresh
    AFTER INSERT OR UPDATE OR DELETE ON crmflow.capture_demands
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION crmflow.refresh_capture_at_commit();
