-- The dashboard's live feed (/ui): a hint on channel crmflow_executions whenever a
-- statement inserts or updates executions. Only a hint, never the data: the listener
-- reads what changed itself (and polls anyway, so a lost hint costs a poll interval).
-- Per statement, never per row: NOTIFY takes a cluster-wide lock at commit, and
-- PostgreSQL folds identical notifications of one transaction into one, so a matcher
-- batch that enrolls 500 executions sends one. A statement that changed no row
-- notifies too; telling that apart would need a transition table, which costs more
-- than a spurious hint (the listener's query is an index range scan).
CREATE FUNCTION crmflow.notify_executions() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('crmflow_executions', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER executions_notify
    AFTER INSERT OR UPDATE ON crmflow.executions
    FOR EACH STATEMENT EXECUTE FUNCTION crmflow.notify_executions();
