-- Suppression lists (engine/suppressions.py, migration 0025).

-- name: not_suppressed
-- The enrollment test every path shares (matcher, scheduler, manual runs, custom events,
-- backfill): true unless the entity is on one of the workflow's lists now, by its key or
-- by the address in its row's "email" field. Filled in by engine/suppressions.py
-- not_suppressed: lists is a jsonb array of list names (the workflow definition's
-- "suppress"; NULL: no list, nothing read), entity_type text, entity_key the key as the
-- outbox records it (an object of the key columns), entity_row the row as jsonb (NULL:
-- keys only). Both branches are index lookups (suppressions_entity_idx and
-- suppressions_email_idx). (No braces in these comments: they are format fields.)
({lists} IS NULL OR NOT EXISTS (
    SELECT 1
      FROM jsonb_array_elements_text({lists}) AS sl(name)
      JOIN crmflow.suppressions AS s ON s.list = sl.name
     WHERE (s.until IS NULL OR s.until > now())
       AND ((s.email IS NULL AND s.entity_type = {entity_type} AND s.entity_key = {entity_key})
            OR (s.email IS NOT NULL AND lower(s.email) = lower({entity_row} ->> 'email')))))

-- name: entity_key
-- An entity's key as the outbox records it, from the text the user gave per key column:
-- each value cast to its column's type through the table's row type (a bad value is the
-- column type's own error), kept only for the key columns.
SELECT jsonb_object_agg(k.col, to_jsonb(r) -> k.col) AS entity_key
  FROM jsonb_populate_record(NULL::{table}, %(given)s::jsonb) AS r
 CROSS JOIN unnest(%(columns)s::text[]) AS k(col);

-- name: add
-- One entry; the same target on the same list again updates it (until, reason, who).
INSERT INTO crmflow.suppressions AS s (list, entity_type, entity_key, email, reason, until, who)
VALUES (%(list)s, %(entity_type)s, %(entity_key)s, %(email)s, %(reason)s, %(until)s, %(who)s)
ON CONFLICT (list, entity_type, entity_key) WHERE email IS NULL
DO UPDATE SET reason = EXCLUDED.reason, until = EXCLUDED.until, who = EXCLUDED.who,
              created_at = now()
RETURNING s.*, (s.until IS NULL OR s.until > now()) AS active;

-- name: add_email
INSERT INTO crmflow.suppressions AS s (list, email, reason, until, who)
VALUES (%(list)s, %(email)s, %(reason)s, %(until)s, %(who)s)
ON CONFLICT (list, lower(email)) WHERE email IS NOT NULL
DO UPDATE SET reason = EXCLUDED.reason, until = EXCLUDED.until, who = EXCLUDED.who,
              email = EXCLUDED.email, created_at = now()
RETURNING s.*, (s.until IS NULL OR s.until > now()) AS active;

-- name: list
SELECT s.*, (s.until IS NULL OR s.until > now()) AS active
  FROM crmflow.suppressions AS s
 WHERE (%(list)s::text IS NULL OR s.list = %(list)s)
   AND (%(entity_type)s::text IS NULL OR s.entity_type = %(entity_type)s)
   AND (%(email)s::text IS NULL OR lower(s.email) = lower(%(email)s))
   AND (%(active)s::boolean IS NULL OR (s.until IS NULL OR s.until > now()) = %(active)s)
 ORDER BY s.list, s.id
 LIMIT %(limit)s OFFSET %(offset)s;

-- name: remove
DELETE FROM crmflow.suppressions AS s
 WHERE s.list = %(list)s
   AND CASE WHEN %(email)s::text IS NOT NULL
            THEN s.email IS NOT NULL AND lower(s.email) = lower(%(email)s)
            ELSE s.email IS NULL AND s.entity_type = %(entity_type)s
                 AND s.entity_key = %(entity_key)s::jsonb END
RETURNING s.id;

-- name: unsubscribed
-- Which of these addresses are on the list "unsubscribed" now (send_email).
SELECT DISTINCT lower(a.address) AS address
  FROM unnest(%(addresses)s::text[]) AS a(address)
  JOIN crmflow.suppressions AS s
    ON s.list = 'unsubscribed' AND s.email IS NOT NULL
   AND lower(s.email) = lower(a.address)
 WHERE s.until IS NULL OR s.until > now();
