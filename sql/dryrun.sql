-- Dry runs: a workflow evaluated on a given or stored row (engine/dryrun.py).

-- name: dry_run
-- The stored predicate and each top-level condition evaluated on one simulated event:
-- ev is a crmflow.outbox row built from JSON, n and o the typed rows the matcher
-- would build from it.
SELECT {columns}, to_jsonb(n) AS evaluated_row
  FROM jsonb_populate_record(NULL::crmflow.outbox, %(event)s::jsonb) AS ev
 CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, coalesce(ev.new_row, ev.old_row)) AS n
 CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, ev.old_row) AS o;

-- name: dry_run_no_entity
SELECT {columns}, NULL::jsonb AS evaluated_row
  FROM jsonb_populate_record(NULL::crmflow.outbox, %(event)s::jsonb) AS ev;
