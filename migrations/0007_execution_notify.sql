-- The dashboard's live feed (/ui): a hint on channel crmflow_executions whenever a
-- statement inserts or updates executions. Only a hint, never the data: the listener
-- reads what changed itself (and polls anyway, so a lost hint costs a poll interval).
-- Per statement, never per row: NOTIFY takes a cluster-wide lock at commit, and
-- PostgreSQL folds identical notifications of one transaction into one, so a matcher
-- batch that enrolls 500 executions sends one.
--
-- And only while a dashboard is open: the feed (api/live.py) pushes listening_until
-- 30 s ahead while it listens, so with no dashboard open the engine's transactions do
-- not notify at all (the same reasoning as crmflow.matcher_state.listening).
CREATE TABLE crmflow.feed_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    listening_until timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO crmflow.feed_state DEFAULT VALUES;

CREATE FUNCTION crmflow.notify_executions() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT listening_until > now() FROM crmflow.feed_state) THEN
        PERFORM pg_notify('crmflow_executions', '');
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER executions_notify
    AFTER INSERT OR UPDATE ON crmflow.executions
    FOR EACH STATEMENT EXECUTE FUNCTION crmflow.notify_executions();
