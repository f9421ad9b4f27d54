-- Entity rows found by their key (engine/rows.py). {table} is the watched table; the
-- key is a JSON object of the key columns.

-- name: entity_row
-- One entity's row as JSON: the key columns of t (the table) are compared with those of
-- p (the key as a typed row). {lock}: nothing, or FOR UPDATE OF t for a step that writes
-- the row in the same transaction. NULL (no row) once the entity is deleted.
SELECT to_jsonb(t) AS row
  FROM jsonb_populate_record(NULL::{table}, %(pk)s::jsonb) AS p
  JOIN {table} AS t ON {pk_match}
 {lock}
