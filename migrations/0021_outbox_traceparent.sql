-- The CRM writer's trace (engine/tracing.py; docs/operations.md, "Tracing"): an
-- application that traces its writes may run
--     SET LOCAL crmflow.traceparent = '00-<trace id>-<span id>-01'
-- in its transaction; once an operator has turned writer links on
-- (SELECT crmflow.keep_writer_traceparent(true)), each row the capture records keeps it
-- (a column default, evaluated in the writer's transaction by the capture's INSERT), and
-- the executions those rows enroll link to that span. Off by default: the default
-- costs the writer a setting lookup per captured row. At most the 55 characters of a
-- W3C traceparent are kept; the matcher checks the form before linking.
ALTER TABLE crmflow.outbox ADD COLUMN traceparent text;

CREATE FUNCTION crmflow.keep_writer_traceparent(keep boolean) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF keep THEN
        ALTER TABLE crmflow.outbox ALTER COLUMN traceparent
            SET DEFAULT nullif(left(current_setting('crmflow.traceparent', true), 55), '');
    ELSE
        ALTER TABLE crmflow.outbox ALTER COLUMN traceparent DROP DEFAULT;
    END IF;
    RETURN keep;
END
$$;
