-- The DDL event trigger that heals capture in the DDL's own transaction (engine/capture.py
-- install_event_trigger runs this script, when the role may create event triggers).

-- Only a superuser may create event triggers; crmflow works without one (the worker
-- heals within seconds). Whatever goes wrong in it is a warning: a user's DDL never
-- fails because of crmflow.
CREATE OR REPLACE FUNCTION crmflow.heal_capture_on_ddl() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- Only DDL on a captured table or below one (a partition created or attached):
    -- the CRM's other DDL, temporary tables above all, pays one catalog look-up.
    IF EXISTS (
        SELECT 1
          FROM pg_event_trigger_ddl_commands() AS cmd
          JOIN pg_class AS rel ON rel.oid = cmd.objid
         WHERE cmd.classid = 'pg_class'::regclass AND rel.relpersistence <> 't'
           AND EXISTS (SELECT 1
                         FROM (SELECT rel.oid AS relid
                               UNION ALL
                               SELECT a.relid FROM pg_partition_ancestors(rel.oid) AS a) AS up
                         JOIN pg_trigger AS t
                           ON t.tgrelid = up.relid AND t.tgname = 'tg_crmflow__insert')
    ) THEN
        PERFORM set_config('lock_timeout', '1s', true);
        PERFORM crmflow.heal_capture(wait => true);
    END IF;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'crmflow could not update capture after this change (%); '
                  'the worker will retry', SQLERRM;
END
$$;

DROP EVENT TRIGGER IF EXISTS crmflow_heal_capture;
CREATE EVENT TRIGGER crmflow_heal_capture ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE')
    EXECUTE FUNCTION crmflow.heal_capture_on_ddl();
