-- The catalog of watched tables (engine/catalog.py, engine/capture.py): tables and their
-- columns and types as PostgreSQL knows them, what crmflow watches, derived fields.

-- name: resolve_table
-- A table by the name a user typed; to_regclass parses quoting and schemas for us.
SELECT c.oid::bigint AS relid, n.nspname AS table_schema, c.relname AS table_name, c.relkind
  FROM pg_class AS c
  JOIN pg_namespace AS n ON n.oid = c.relnamespace
 WHERE c.oid = to_regclass(%(name)s);

-- name: primary_key_columns
SELECT a.attname AS name
  FROM pg_index AS i
  CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, position)
  JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
 WHERE i.indrelid = %(relid)s AND i.indisprimary
 ORDER BY k.position;

-- name: table_columns
-- Columns with the facts the compiler needs. Domains are read through to their base
-- type for the operator family, but values are cast to the declared type so the
-- domain's own checks apply.
SELECT a.attname AS name,
       a.attnotnull AS not_null,
       format_type(a.atttypid, a.atttypmod) AS display_type,
       format('%%I.%%I', tn.nspname, t.typname) AS type_sql,
       bt.typcategory AS category,
       bt.typname AS base_typname,
       CASE WHEN bt.typtype = 'e' THEN
            ARRAY(SELECT e.enumlabel::text FROM pg_enum AS e
                   WHERE e.enumtypid = bt.oid ORDER BY e.enumsortorder)
       END AS enum_labels,
       et.typcategory AS elem_category,
       et.typname AS elem_typname,
       CASE WHEN et.oid IS NOT NULL THEN format('%%I.%%I', etn.nspname, et.typname) END
           AS elem_type_sql,
       CASE WHEN et.typtype = 'e' THEN
            ARRAY(SELECT e.enumlabel::text FROM pg_enum AS e
                   WHERE e.enumtypid = et.oid ORDER BY e.enumsortorder)
       END AS elem_enum_labels
  FROM pg_attribute AS a
  JOIN pg_type AS t ON t.oid = a.atttypid
  JOIN pg_namespace AS tn ON tn.oid = t.typnamespace
  JOIN pg_type AS bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
  LEFT JOIN pg_type AS et ON et.oid = bt.typelem AND bt.typcategory = 'A'
  LEFT JOIN pg_namespace AS etn ON etn.oid = et.typnamespace
 WHERE a.attrelid = %(relid)s AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum;

-- name: type_facts
-- The same facts for a type named by OID (derived fields' result types).
SELECT format_type(t.oid, NULL) AS data_type,
       format('%%I.%%I', tn.nspname, t.typname) AS type_sql,
       bt.typcategory AS category,
       bt.typname AS base_typname
  FROM pg_type AS t
  JOIN pg_namespace AS tn ON tn.oid = t.typnamespace
  JOIN pg_type AS bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
 WHERE t.oid = %(type_oid)s;

-- name: watched_tables_with_oid
-- key_now: the table's primary key as it is now (it may differ from pk_columns between a
-- key change and capture's heal; events are keyed by the current key meanwhile).
SELECT w.entity_type, w.table_schema, w.table_name, w.pk_columns,
       t.relid::oid::bigint AS relid,
       ARRAY(SELECT a.attname::text
               FROM pg_index AS i
              CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, position)
               JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
              WHERE i.indrelid = t.relid AND i.indisprimary
              ORDER BY k.position) AS key_now
  FROM crmflow.watched_tables AS w
 CROSS JOIN LATERAL (SELECT to_regclass(format('%%I.%%I', w.table_schema, w.table_name))
                            AS relid) AS t
 ORDER BY w.entity_type;

-- name: derived_fields
-- A type renamed or dropped since the field was declared gives NULL facts (to_regtype,
-- not ::regtype, which would fail the whole query): engine/catalog.py asks again.
SELECT d.entity_type, d.name, d.source, d.data_type, d.expression,
       CASE WHEN t.oid IS NOT NULL THEN format('%%I.%%I', tn.nspname, t.typname) END
           AS type_sql,
       bt.typcategory AS category,
       bt.typname AS base_typname
  FROM crmflow.derived_fields AS d
  LEFT JOIN pg_type AS t ON t.oid = to_regtype(d.data_type)
  LEFT JOIN pg_namespace AS tn ON tn.oid = t.typnamespace
  LEFT JOIN pg_type AS bt
         ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
 ORDER BY d.entity_type, d.name;

-- name: watch_table
-- Returns the entity the table is watched as: the new row, or the existing one.
-- Nothing comes back when the entity name belongs to another table.
WITH inserted AS (
    INSERT INTO crmflow.watched_tables (entity_type, table_schema, table_name, pk_columns)
    VALUES (%(entity_type)s, %(table_schema)s, %(table_name)s, %(pk_columns)s)
    ON CONFLICT DO NOTHING
    RETURNING entity_type
), existing AS (
    UPDATE crmflow.watched_tables
       SET pk_columns = %(pk_columns)s
     WHERE table_schema = %(table_schema)s AND table_name = %(table_name)s
    RETURNING entity_type
)
SELECT entity_type FROM inserted
UNION ALL
SELECT entity_type FROM existing;

-- name: set_capture_all
UPDATE crmflow.watched_tables SET capture_all = %(capture_all)s
 WHERE entity_type = %(entity_type)s;

-- name: watched_by_entity
SELECT entity_type, table_schema, table_name, pk_columns
  FROM crmflow.watched_tables WHERE entity_type = %(entity_type)s;

-- name: watched_by_table
SELECT entity_type, table_schema, table_name, pk_columns
  FROM crmflow.watched_tables
 WHERE table_schema = %(table_schema)s AND table_name = %(table_name)s;

-- name: unwatch_table
DELETE FROM crmflow.watched_tables WHERE entity_type = %(entity_type)s;

-- name: list_watched
SELECT w.entity_type, w.table_schema, w.table_name, w.pk_columns, w.created_at,
       (SELECT coalesce(jsonb_object_agg(d.name, d.source), '{}')
          FROM crmflow.derived_fields AS d WHERE d.entity_type = w.entity_type) AS derived_fields
  FROM crmflow.watched_tables AS w
 ORDER BY w.entity_type;

-- name: upsert_derived_field
INSERT INTO crmflow.derived_fields (entity_type, name, expression, source, data_type)
VALUES (%(entity_type)s, %(name)s, %(expression)s, %(source)s, %(data_type)s)
ON CONFLICT (entity_type, name) DO UPDATE
   SET expression = EXCLUDED.expression, source = EXCLUDED.source,
       data_type = EXCLUDED.data_type;

-- name: live_workflows_of_entity
SELECT w.id, w.name, w.status
  FROM crmflow.workflows AS w
  JOIN crmflow.workflow_versions AS v ON v.workflow_id = w.id AND v.version = w.current_version
 WHERE v.entity_type = %(entity_type)s AND w.status <> 'archived';

-- name: pause_workflows_of_entity
UPDATE crmflow.workflows AS w
   SET status = 'paused', updated_at = now()
  FROM crmflow.workflow_versions AS v
 WHERE v.workflow_id = w.id AND v.version = w.current_version
   AND v.entity_type = %(entity_type)s AND w.status = 'active';
