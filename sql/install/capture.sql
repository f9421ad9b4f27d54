-- Capture: statement-level AFTER triggers with transition tables copy each changed
-- row that some active workflow could match (the capture filter, below) into
-- crmflow.outbox in the writer's own transaction (a rollback captures nothing). One INSERT ... SELECT per statement, so a 100k-row INSERT ... SELECT
-- pays one trigger call, not 100k.
--
-- The capture code lives in the writer's transaction, so it must never be the reason a
-- write fails (docs/design.md, "The host comes first"). The generated functions:
--   * name no column of the table: a row is read whole (`t.*`, which PostgreSQL
--     resolves as the relation, never as a column), keys are read out of its JSON, so
--     no column name (`n`, `o`, `j`, a plpgsql variable's name) can collide, and a
--     renamed, retyped or dropped column cannot make the trigger fail;
--   * declare no plpgsql variable, for the same reason;
--   * fall back to the table's current primary key, read from the catalog, for a row
--     that lacks the key columns they were generated with (the key was renamed; the
--     worker's heal regenerates them within seconds, crmflow.heal_capture below);
--   * turn each row into JSON once (MATERIALIZED CTEs): an update's `changed` list
--     costs one pass over the row's keys, linear in the number of columns.
-- Partitions carry the same triggers as their root (a write straight into a partition
-- fires only the partition's statement triggers), and partitions created or attached
-- later get them from crmflow.heal_capture.
--
-- This script is (re)applied by `crmflow migrate` on every run; engine/capture.py calls
-- crmflow.install_capture and crmflow.heal_capture through the named queries of
-- sql/capture.sql.
-- The write context: the depth and actor of the current write. The engine sets them
-- before its actions' writes with crmflow.set_write_context, which signs them for the
-- current transaction; capture trusts them only with a valid signature. A CRM session
-- that sets crmflow.depth or crmflow.actor itself is ignored: its writes have depth 0
-- and the session user as actor, like all people's writes.
CREATE OR REPLACE FUNCTION crmflow.write_context_signed() RETURNS boolean
    LANGUAGE sql VOLATILE AS $$
    SELECT coalesce(current_setting('crmflow.context_sig', true) =
                    md5(k.secret || ':' || pg_current_xact_id()::text || ':'
                        || current_setting('crmflow.depth', true) || ':'
                        || current_setting('crmflow.actor', true)), false)
      FROM crmflow.write_context_key AS k
$$;

CREATE OR REPLACE FUNCTION crmflow.set_write_context(depth integer, actor text) RETURNS void
    LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT set_config('crmflow.depth', depth::text, true),
           set_config('crmflow.actor', actor, true),
           set_config('crmflow.context_sig',
                      md5(k.secret || ':' || pg_current_xact_id()::text || ':'
                          || depth::text || ':' || actor), true)
      FROM crmflow.write_context_key AS k
$$;
-- Only crmflow's roles (the runtime role gets EXECUTE on crmflow's functions).
REVOKE EXECUTE ON FUNCTION crmflow.set_write_context(integer, text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION crmflow.current_depth() RETURNS integer
    LANGUAGE sql VOLATILE AS $$
    SELECT CASE WHEN coalesce(current_setting('crmflow.depth', true), '') = '' THEN 0
                WHEN crmflow.write_context_signed() THEN current_setting('crmflow.depth')::integer
                ELSE 0 END
$$;

CREATE OR REPLACE FUNCTION crmflow.current_actor() RETURNS text
    LANGUAGE sql VOLATILE AS $$
    SELECT CASE WHEN coalesce(current_setting('crmflow.actor', true), '') <> ''
                 AND crmflow.write_context_signed() THEN current_setting('crmflow.actor')
                ELSE session_user::text END
$$;

-- The wake-up hint. NOTIFY takes a cluster-wide lock at commit that serialises
-- notifying transactions, so writers only notify while a matcher says it is idle
-- and listening. A busy matcher keeps draining without hints; the poll loop covers
-- the short race around going idle. NOTIFY folds duplicates within a transaction.
CREATE OR REPLACE FUNCTION crmflow.wake_matcher() RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT listening FROM crmflow.matcher_state) THEN
        PERFORM pg_notify('crmflow_outbox', '');
    END IF;
END
$$;

-- The columns an update changed, in name order: computed by readers from the captured
-- rows, off the writer's path (outbox.changed is only filled by older versions).
CREATE OR REPLACE FUNCTION crmflow.changed_columns(new_row jsonb, old_row jsonb) RETURNS text[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN new_row IS NOT NULL AND old_row IS NOT NULL THEN
           ARRAY(SELECT e.key FROM jsonb_each(new_row) AS e
                  WHERE e.value IS DISTINCT FROM old_row -> e.key ORDER BY e.key) END
$$;

-- The primary key of a table as it is now, in key order.
CREATE OR REPLACE FUNCTION crmflow.primary_key_of(relid oid) RETURNS text[]
    LANGUAGE sql STABLE AS $$
    SELECT array_agg(a.attname::text ORDER BY k.position)
      FROM pg_index AS i
     CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, position)
      JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = relid AND i.indisprimary
$$;

-- A captured row's key by the table's current primary key: the capture functions' slow
-- path, taken only for rows that lack the key columns the functions were generated
-- with. NULL when the table has no primary key any more.
CREATE OR REPLACE FUNCTION crmflow.capture_key(relid oid, captured jsonb) RETURNS jsonb
    LANGUAGE sql STABLE AS $$
    SELECT jsonb_object_agg(k.name, captured -> k.name)
      FROM unnest(crmflow.primary_key_of(relid)) AS k(name)
$$;

-- ── The capture filter (docs/design.md, "Capture keeps what can match") ──
-- Each workflow version carries its filter (workflow_versions.capture_filter, compiled
-- by engine/prefilter.py when it is saved): per operation, a tree that is true for
-- every row pair the version could match, over the captured rows' JSON alone. It is
-- rendered here, node by node from a fixed list, every key and value a quoted literal:
-- whatever a stored tree holds, the SQL it renders cannot fail on any row (no cast,
-- no function that raises), so it can sit in the writer's trigger. Unknown nodes
-- render as true (keep).
--   true | false
--   {"and": [...]} | {"or": [...]} | {"not": node}
--   {"changed": key}: the key's value differs between old and new (true when either
--       row lacks the key: a renamed column is not a reason to drop a row)
--   {"test": {"row": "n"|"o", "key", "type": "number"|"string"|"boolean"|"array",
--             "op": "eq"|"lt"|"le"|"gt"|"ge"|"empty"|"null", "value", "null": bool,
--             "other": bool}}: the value under key, when of that JSON type, compared
--       with value (numbers as numbers, strings bytewise, as COLLATE "C"); JSON null
--       gives "null", a missing key or another JSON type gives "other".
CREATE OR REPLACE FUNCTION crmflow.render_capture_filter(
    node jsonb, new_row text, old_row text, depth integer DEFAULT 0)
    RETURNS text LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $render$
DECLARE
    k text;
    parts text[];
    t jsonb;
    r text;
    v text;
    kind text;
    op text;
    val jsonb;
    sym text;
    cmp text;
BEGIN
    IF node IS NULL OR depth > 64 THEN
        RETURN 'true';
    END IF;
    IF jsonb_typeof(node) = 'boolean' THEN
        RETURN CASE WHEN node = 'false'::jsonb THEN 'false' ELSE 'true' END;
    END IF;
    IF jsonb_typeof(node) <> 'object' THEN
        RETURN 'true';
    END IF;
    IF node ? 'and' OR node ? 'or' THEN
        k := CASE WHEN node ? 'and' THEN 'and' ELSE 'or' END;
        IF jsonb_typeof(node -> k) <> 'array' THEN
            RETURN 'true';
        END IF;
        SELECT array_agg(crmflow.render_capture_filter(e.item, new_row, old_row, depth + 1)
                         ORDER BY e.i)
          INTO parts
          FROM jsonb_array_elements(node -> k) WITH ORDINALITY AS e(item, i);
        IF parts IS NULL THEN
            RETURN CASE k WHEN 'and' THEN 'true' ELSE 'false' END;
        END IF;
        RETURN '(' || array_to_string(parts, CASE k WHEN 'and' THEN ' AND ' ELSE ' OR ' END) || ')';
    END IF;
    IF node ? 'not' THEN
        RETURN '(NOT ' || crmflow.render_capture_filter(node -> 'not', new_row, old_row, depth + 1)
               || ')';
    END IF;
    IF node ? 'changed' THEN
        IF old_row IS NULL OR new_row IS NULL OR jsonb_typeof(node -> 'changed') <> 'string' THEN
            RETURN 'true';
        END IF;
        RETURN format('(CASE WHEN %1$s ? %3$L AND %2$s ? %3$L '
                      'THEN (%1$s -> %3$L) IS DISTINCT FROM (%2$s -> %3$L) ELSE true END)',
                      new_row, old_row, node ->> 'changed');
    END IF;
    IF node ? 'test' THEN
        t := node -> 'test';
        IF jsonb_typeof(t) <> 'object' OR jsonb_typeof(t -> 'key') IS DISTINCT FROM 'string' THEN
            RETURN 'true';
        END IF;
        r := CASE t ->> 'row' WHEN 'n' THEN new_row WHEN 'o' THEN old_row END;
        k := t ->> 'key';
        kind := t ->> 'type';
        op := t ->> 'op';
        val := t -> 'value';
        IF r IS NULL OR kind IS NULL OR kind NOT IN ('number', 'string', 'boolean', 'array') THEN
            RETURN 'true';
        END IF;
        v := format('(%s -> %L)', r, k);
        sym := CASE op WHEN 'lt' THEN '<' WHEN 'le' THEN '<=' WHEN 'gt' THEN '>'
                       WHEN 'ge' THEN '>=' END;
        cmp := CASE
            WHEN op = 'eq' AND jsonb_typeof(val) = kind THEN
                format('%s = %L::jsonb', v, val::text)
            WHEN sym IS NOT NULL AND kind = 'number' AND jsonb_typeof(val) = 'number' THEN
                format('%s %s %L::jsonb', v, sym, val::text)
            WHEN sym IS NOT NULL AND kind = 'string' AND jsonb_typeof(val) = 'string' THEN
                format('(%s #>> ''{}'') COLLATE "C" %s %L::text', v, sym, val #>> '{}')
            WHEN op = 'empty' AND kind = 'string' THEN format('%s = ''""''::jsonb', v)
            WHEN op = 'empty' AND kind = 'array' THEN format('%s = ''[]''::jsonb', v)
            WHEN op IN ('empty', 'null') THEN 'false'
        END;
        IF cmp IS NULL THEN
            RETURN 'true';
        END IF;
        RETURN format('(CASE WHEN NOT (%1$s ? %2$L) THEN %3$s '
                      'WHEN jsonb_typeof(%4$s) = ''null'' THEN %5$s '
                      'WHEN jsonb_typeof(%4$s) = %6$L THEN %7$s ELSE %3$s END)',
                      r, k,
                      CASE WHEN t -> 'other' = 'false'::jsonb THEN 'false' ELSE 'true' END,
                      v,
                      CASE WHEN t -> 'null' = 'true'::jsonb THEN 'true' ELSE 'false' END,
                      kind, cmp);
    END IF;
    RETURN 'true';
END
$render$;

-- The rows of an entity's operation (insert, update, delete) that capture keeps: some
-- active workflow's filter for it holds (broken workflows count: their events are
-- replayed once they are fixed). 'false' when no active workflow matches that
-- operation, 'true' when the table keeps every row (capture_all) or one of them keeps
-- everything. new_row and old_row: the SQL of the captured rows' JSON ("n" of the
-- matcher is new_row, the deleted row for deletes).
-- Read under the entity's capture lock in READ COMMITTED (crmflow.generate_capture),
-- so no concurrent activation can be missed; in a transaction that keeps one snapshot
-- (REPEATABLE READ and up) a concurrent one could be, so everything is kept.
CREATE OR REPLACE FUNCTION crmflow.capture_filter(
    entity text, op text, new_row text, old_row text) RETURNS text
    LANGUAGE plpgsql STABLE AS $filter$
DECLARE
    parts text[];
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed'
       OR coalesce((SELECT w.capture_all FROM crmflow.watched_tables AS w
                     WHERE w.entity_type = entity), true)
       -- A capture demand (migration 0022) keeps every row of its operations.
       OR EXISTS (SELECT 1 FROM crmflow.capture_demands AS d
                   WHERE d.entity_type = entity AND d.operation = op) THEN
        RETURN 'true';
    END IF;
    SELECT array_agg(DISTINCT f.part ORDER BY f.part) INTO parts
      FROM (SELECT CASE
                   WHEN v.capture_filter IS NULL THEN
                       CASE WHEN (v.trigger_type, op) IN (('entity_created', 'insert'),
                                                          ('entity_updated', 'update'),
                                                          ('field_updated', 'update'),
                                                          ('entity_deleted', 'delete'))
                            THEN 'true' END
                   WHEN v.capture_filter ? op THEN
                       crmflow.render_capture_filter(v.capture_filter -> op, new_row, old_row)
                   END AS part
              FROM crmflow.workflows AS w
              JOIN crmflow.workflow_versions AS v
                ON v.workflow_id = w.id AND v.version = w.current_version
             WHERE w.status = 'active' AND v.entity_type = entity) AS f
     WHERE f.part IS NOT NULL AND f.part <> 'false';
    IF parts IS NULL THEN
        RETURN 'false';
    END IF;
    IF 'true' = ANY(parts) THEN
        RETURN 'true';
    END IF;
    RETURN '(' || array_to_string(parts, ' OR ') || ')';
END
$filter$;

-- Column pruning: the columns of an entity's table that capture leaves out of the rows it
-- stores, as they are now; empty: every column is kept. A column is kept when it is part
-- of the key, or named (as a whole word) anywhere in the definition of an active
-- workflow on the entity (conditions, templates, trigger fields, limits' keys, goals,
-- whatever a definition holds) or in the source of a derived field so named, or by a
-- capture demand (migration 0022); every column is kept when the table keeps every row
-- or every column (`crmflow watch --all-rows` / `--all-columns`), a demand reads all
-- columns, or an active workflow on the entity is triggered by updates as a whole
-- (entity_updated) or by deletes (the executor re-reads the entity by its key, but a
-- deleted one is seen as its captured row), names `event` (templates may read the
-- captured rows whole), is broken, or was saved without a capture filter. Columns whose
-- names are not plain words are always kept. A column added later is kept until the
-- next regeneration (the list names the columns left out, not those kept), which the
-- worker's heal makes (crmflow.capture_columns_stale). Read like
-- crmflow.capture_filter, under the entity's capture lock in READ COMMITTED.
CREATE OR REPLACE FUNCTION crmflow.capture_pruned_columns(entity text) RETURNS text[]
    LANGUAGE plpgsql STABLE AS $pruned$
DECLARE
    rel regclass;
    words text[];
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RETURN '{}';
    END IF;
    SELECT CASE WHEN NOT (w.capture_all OR w.capture_all_columns)
                THEN to_regclass(format('%I.%I', w.table_schema, w.table_name)) END
      INTO rel
      FROM crmflow.watched_tables AS w WHERE w.entity_type = entity;
    IF rel IS NULL
       OR EXISTS (SELECT 1 FROM crmflow.capture_demands AS d
                   WHERE d.entity_type = entity AND d.columns IS NULL)
       OR EXISTS (SELECT 1
                    FROM crmflow.workflows AS w
                    JOIN crmflow.workflow_versions AS v
                      ON v.workflow_id = w.id AND v.version = w.current_version
                   WHERE w.status = 'active' AND v.entity_type = entity
                     AND (v.trigger_type IN ('entity_updated', 'entity_deleted')
                          OR v.capture_filter IS NULL
                          OR w.broken_reason IS NOT NULL)) THEN
        RETURN '{}';
    END IF;
    -- The words of the definitions and the demands' columns (one pass over each text:
    -- with 1,000 active workflows on a table this takes milliseconds, not a regular
    -- expression per column over all of them).
    words := ARRAY(
        SELECT DISTINCT t.word
          FROM (SELECT v.definition::text AS body
                  FROM crmflow.workflows AS w
                  JOIN crmflow.workflow_versions AS v
                    ON v.workflow_id = w.id AND v.version = w.current_version
                 WHERE w.status = 'active' AND v.entity_type = entity
                UNION ALL
                SELECT array_to_string(d.columns, ' ')
                  FROM crmflow.capture_demands AS d WHERE d.entity_type = entity) AS b
         CROSS JOIN LATERAL regexp_split_to_table(b.body, '[^A-Za-z0-9_]+') AS t(word)
         WHERE t.word <> '');
    IF 'event' = ANY(words) THEN
        RETURN '{}';
    END IF;
    -- The words of the sources of the derived fields named (their expressions read columns).
    words := words || ARRAY(
        SELECT t.word
          FROM crmflow.derived_fields AS f
         CROSS JOIN LATERAL regexp_split_to_table(f.source, '[^A-Za-z0-9_]+') AS t(word)
         WHERE f.entity_type = entity AND f.name = ANY(words));
    RETURN ARRAY(
        SELECT a.attname::text
          FROM pg_attribute AS a
         WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
           AND a.attname ~ '^[A-Za-z_][A-Za-z0-9_]*$'
           AND NOT a.attname = ANY(coalesce(crmflow.primary_key_of(rel), '{}'))
           AND NOT a.attname = ANY(words)
         ORDER BY a.attnum);
END
$pruned$;

-- (Re)generate the three capture functions of an entity, with its capture filter.
-- Replacing a function takes no lock on the table (writers pick up the new body at
-- their next statement), but every session recompiles it, so it is done only when the
-- body changes.
--
-- A filtered body must never drop a row that a workflow activated (or edited) in
-- another transaction is entitled to: every write committed after the activation
-- (migration 0015's snapshot). Three things make that exact:
--   * the writer takes the entity's capture lock in shared mode without waiting
--     (pg_try_advisory_xact_lock_shared, held to the end of its transaction) before
--     filtering; when it cannot (a regeneration holds or awaits it), it keeps every row;
--   * a regeneration takes that lock exclusively (here): it waits for the writers still
--     filtering with the old body, and holds it until it commits;
--   * the body carries an epoch, the value of the entity's sequence when it was made;
--     the regeneration bumps the sequence (not transactional: visible at once), so a
--     writer still running a body it looked up before the commit keeps every row;
-- and crmflow.refresh_capture takes the activation's snapshot again once it holds the
-- lock. Writers never wait: only the regeneration does.
CREATE OR REPLACE FUNCTION crmflow.generate_capture(entity text, key_columns text[])
    RETURNS void LANGUAGE plpgsql AS $generate$
DECLARE
    key_expr text;
    op text;
    rows_table text;
    row_column text;
    -- Once per statement (uncorrelated sub-selects); the signature is only checked when
    -- a context is set at all, so people's writes pay two current_setting calls.
    depth_expr constant text := '(SELECT crmflow.current_depth())';
    actor_expr constant text := '(SELECT crmflow.current_actor())';
    wake constant text :=
        'IF FOUND AND (SELECT listening FROM crmflow.matcher_state) THEN '
        'PERFORM pg_notify(''crmflow_outbox'', ''''); END IF; RETURN NULL;';
    rows_json constant text := '(SELECT to_jsonb(t.*) AS j FROM %s AS t OFFSET 0) AS r';
    -- They run as crmflow's owner, so the CRM's role needs no privilege on crmflow's
    -- tables (and cannot write the outbox itself: events cannot be forged); the search
    -- path is pinned so a writer's own search_path cannot redirect what they call.
    definer constant text := 'SECURITY DEFINER SET search_path = pg_catalog, pg_temp';
    lock_key constant integer := hashtext('crmflow.capture');
    epoch_seq text := format('crmflow.%I', 'tg_' || entity || '__epoch');
    epoch bigint;
    guard text;
    f_insert text;
    f_update text;
    f_delete text;
    f_key_delete text;
    f_key_insert text;
    bodies text[];
    names text[];
    i integer;
    insert_sql text;
    update_sql text;
    update_probe text;
    update_whole text;
    update_pruned text;
    f text;
    -- Column pruning: the columns left out of the stored rows (crmflow.capture_pruned_columns).
    pruned text[];
    stored text;   -- a captured row as stored: r.j, less the pruned columns
    kept text;     -- n.j / o.j, or their pruned copy p
    prune_cte text;
    -- The kept columns read straight from the typed rows (see below).
    rel regclass;
    columns_now text[];
    kept_columns text[];
    typed_rows text;
    typed_same text;
    source text;
    insert_whole text;
    insert_pruned text;
    insert_typed text;
    update_typed_probe text;
    update_typed text;
    update_typed_all text;
    marker text;
    every_column boolean;
BEGIN
    IF entity !~ '^[a-z_][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'entity name % cannot be captured', entity;
    END IF;
    IF coalesce(cardinality(key_columns), 0) = 0 THEN
        RAISE EXCEPTION 'entity % has no key columns', entity;
    END IF;
    IF to_regclass(epoch_seq) IS NULL THEN
        EXECUTE format('CREATE SEQUENCE IF NOT EXISTS %s', epoch_seq);
        PERFORM nextval(epoch_seq::regclass);
    END IF;
    -- Wait for the writers filtering with the current body; the filters are read after.
    PERFORM pg_advisory_xact_lock(lock_key, hashtext(entity));
    f_insert := crmflow.capture_filter(entity, 'insert', 'r.j', NULL);
    f_delete := crmflow.capture_filter(entity, 'delete', 'r.j', NULL);
    f_update := crmflow.capture_filter(entity, 'update', 'n.j', 'o.j');
    f_key_delete := crmflow.capture_filter(entity, 'delete', 'o.j', NULL);
    f_key_insert := crmflow.capture_filter(entity, 'insert', 'n.j', NULL);
    pruned := coalesce(crmflow.capture_pruned_columns(entity), '{}');
    -- A key a filter reads is never left out (the filters are rendered over the kept
    -- columns below; the definitions name them all, this only makes it certain).
    pruned := ARRAY(
        SELECT c FROM unnest(pruned) WITH ORDINALITY AS u(c, i)
         WHERE NOT EXISTS (
               SELECT 1
                 FROM crmflow.workflows AS w
                 JOIN crmflow.workflow_versions AS v
                   ON v.workflow_id = w.id AND v.version = w.current_version
                CROSS JOIN LATERAL jsonb_path_query(v.capture_filter, 'strict $.**') AS x(node)
                WHERE w.status = 'active' AND v.entity_type = entity
                  AND jsonb_typeof(x.node) = 'string' AND x.node #>> '{}' = u.c)
         ORDER BY u.i);
    -- Pruning by subtracting the pruned names from each row's JSON (`r.j - text[]`)
    -- compares every key with every pruned name: on a 500-column table with 498 left out
    -- that made an update three to four times as slow as whole rows. So when the table's
    -- columns are the ones the body was made with (a catalog look-up per statement, in
    -- the generated `typed_same`), the body builds the kept columns straight from the
    -- typed rows (jsonb_build_object of t.<column>, never to_jsonb of the whole row).
    -- Otherwise (a column added, renamed or dropped since, until the next regeneration)
    -- it subtracts as before, never naming a column that may be gone: a statement that
    -- names a column is only planned when it runs, and it only runs when the check holds.
    SELECT to_regclass(format('%I.%I', w.table_schema, w.table_name)),
           w.capture_all OR w.capture_all_columns
      INTO rel, every_column
      FROM crmflow.watched_tables AS w WHERE w.entity_type = entity;
    IF rel IS NOT NULL THEN
        columns_now := ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute AS a
                              WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
                              ORDER BY a.attname);
        kept_columns := ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute AS a
                               WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
                                 AND NOT a.attname::text = ANY(pruned)
                               ORDER BY a.attnum);
    END IF;
    -- (A table keeping every column by choice does not depend on its columns.)
    marker := CASE WHEN every_column THEN '/* crmflow capture of every column */ '
                   ELSE format('/* crmflow capture of columns %s */ ',
                               md5(coalesce(columns_now, '{}')::text)) END;
    -- On a narrow table the subtraction is cheaper than that look-up (columns x pruned
    -- under 2,000 comparisons: a 16-column table with 12 left out costs a microsecond).
    IF cardinality(pruned) > 0 AND key_columns <@ columns_now AND cardinality(kept_columns) > 0
       AND cardinality(columns_now) * cardinality(pruned) >= 2000
    THEN
        -- jsonb_build_object takes at most 100 arguments: chunks of 50 columns.
        typed_rows := format(
            '(SELECT %s AS j, jsonb_build_object(%s) AS k FROM %%s AS t OFFSET 0) AS r',
            (SELECT string_agg(format('jsonb_build_object(%s)', c.pairs), ' || ' ORDER BY c.chunk)
               FROM (SELECT (u.i - 1) / 50 AS chunk,
                            string_agg(format('%L, t.%I', u.c, u.c), ', ' ORDER BY u.i) AS pairs
                       FROM unnest(kept_columns) WITH ORDINALITY AS u(c, i)
                      GROUP BY 1) AS c),
            (SELECT string_agg(format('%L, t.%I', c, c), ', ' ORDER BY u.i)
               FROM unnest(key_columns) WITH ORDINALITY AS u(c, i)));
        typed_same := format(
            'ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute AS a '
            'WHERE a.attrelid = TG_RELID AND a.attnum > 0 AND NOT a.attisdropped '
            'ORDER BY a.attname) = %L::text[]', columns_now);
    END IF;
    IF cardinality(pruned) > 0 THEN
        stored := format('(r.j - %L::text[])', pruned);
        kept := 'p';
        prune_cte := format(', (r.j - %L::text[]) AS p', pruned);
    ELSE
        stored := 'r.j';
        kept := 'j';
        prune_cte := '';
    END IF;

    -- {"id": r.j -> 'id'} when the row has the key it was generated with, else the
    -- table's key now (TG_RELID: the partition or table the statement wrote).
    key_expr := format(
        'CASE WHEN r.j ?& %L::text[] THEN jsonb_build_object(%s) '
        'ELSE crmflow.capture_key(TG_RELID, r.j) END',
        key_columns,
        (SELECT string_agg(format('%L, r.j -> %L', c, c), ', ' ORDER BY u.i)
           FROM unnest(key_columns) WITH ORDINALITY AS u(c, i)));

    names := ARRAY['tg_' || entity || '__insert', 'tg_' || entity || '__update',
                   'tg_' || entity || '__delete'];
    -- Twice at most: with the epoch of the bodies in place (nothing to do when they are
    -- the same), then with a new one.
    EXECUTE format('SELECT last_value FROM %s', epoch_seq) INTO epoch;
    FOR attempt IN 1..2 LOOP
        IF attempt = 2 THEN
            epoch := nextval(epoch_seq::regclass);
        END IF;
        -- (A sequence dropped by hand gives NULL: every row kept, no error.)
        guard := format('pg_try_advisory_xact_lock_shared(%s, %s) AND '
                        'pg_sequence_last_value(to_regclass(%L)) = %s',
                        lock_key, hashtext(entity), epoch_seq, epoch);
        bodies := ARRAY[]::text[];
        -- Inserts and deletes: the rows of the statement's one transition table.
        -- Each body has a whole variant (every row, whole: what a writer stores when it
        -- cannot trust the body's filter and column list, the guard failing) and, when
        -- the entity has a filter or pruned columns, a guarded one.
        --   keep every row: the whole INSERT, or (pruned) IF NOT guard whole ELSE pruned;
        --   keep no row: IF guard nothing ELSE whole;
        --   filtered: IF NOT guard whole ELSIF the probe finds a row kept THEN the pruned
        --   INSERT of the rows kept. The probe (EXISTS, which stops at the first row
        --   kept) comes before the INSERT, so a statement none of whose rows can match
        --   pays the guard and the probe, not an INSERT's start-up on the outbox
        --   (docs/design.md, "Capture keeps what can match", has the figures). The guard
        --   is tested with IS NOT TRUE: NULL (the sequence gone) keeps every row, whole.
        FOR op, rows_table, row_column IN
            VALUES ('insert', 'new_rows', 'new_row'), ('delete', 'old_rows', 'old_row')
        LOOP
            insert_sql := format(
                'INSERT INTO crmflow.outbox (entity_type, op, pk, %s, depth, actor) '
                'SELECT %L, %L, <<key>>, <<stored>>, %s, %s FROM <<rows>>',
                row_column, entity, op, depth_expr, actor_expr);
            insert_whole := replace(replace(replace(insert_sql, '<<key>>', key_expr),
                                            '<<stored>>', 'r.j'),
                                    '<<rows>>', format(rows_json, rows_table));
            insert_pruned := replace(replace(replace(insert_sql, '<<key>>', key_expr),
                                             '<<stored>>', stored),
                                     '<<rows>>', format(rows_json, rows_table));
            insert_typed := replace(replace(replace(insert_sql, '<<key>>', 'r.k'),
                                            '<<stored>>', 'r.j'),
                                    '<<rows>>', format(typed_rows, rows_table));
            f := CASE op WHEN 'insert' THEN f_insert ELSE f_delete END;
            bodies := bodies || CASE
                WHEN f = 'true' AND stored = 'r.j' THEN
                    format('BEGIN %s; %s END', insert_whole, wake)
                WHEN f = 'true' AND typed_same IS NOT NULL THEN
                    format('BEGIN IF (%s) IS NOT TRUE THEN %s; ELSIF %s THEN %s; ELSE %s; END IF; '
                           '%s END',
                           guard, insert_whole, typed_same, insert_typed, insert_pruned, wake)
                WHEN f = 'true' THEN
                    format('BEGIN IF (%s) IS NOT TRUE THEN %s; ELSE %s; END IF; %s END',
                           guard, insert_whole, insert_pruned, wake)
                WHEN f = 'false' THEN
                    format('BEGIN IF %s THEN NULL; ELSE %s; END IF; %s END',
                           guard, insert_whole, wake)
                WHEN typed_same IS NOT NULL THEN
                    format('BEGIN IF (%1$s) IS NOT TRUE THEN %2$s; '
                           'ELSIF %7$s THEN '
                           'IF EXISTS (SELECT FROM %8$s WHERE %4$s) THEN %9$s WHERE %4$s; '
                           'ELSE RETURN NULL; END IF; '
                           'ELSIF EXISTS (SELECT FROM %3$s WHERE %4$s) THEN %5$s WHERE %4$s; '
                           'ELSE RETURN NULL; END IF; %6$s END',
                           guard, insert_whole, format(rows_json, rows_table), f,
                           insert_pruned, wake, typed_same, format(typed_rows, rows_table),
                           insert_typed)
                ELSE format('BEGIN IF (%1$s) IS NOT TRUE THEN %2$s; '
                            'ELSIF EXISTS (SELECT FROM %3$s WHERE %4$s) THEN %5$s WHERE %4$s; '
                            'ELSE RETURN NULL; END IF; %6$s END',
                            guard, insert_whole, format(rows_json, rows_table), f,
                            insert_pruned, wake)
                END;
        END LOOP;

        -- Updates: rows are paired old/new by primary key. A row whose key itself
        -- changed has no pair: it is captured as the delete of the old key and the
        -- insert of the new one (and filtered as such). Updates that change no column
        -- (no column kept, when pruned) are not captured. Which columns changed is left
        -- to readers (crmflow.changed_columns): that diff was half the writer's cost on
        -- wide tables. The variants: 1 the probe of the filtered one (is any pair kept?),
        -- 2 the filtered one (pruned), 3 every row whole, 4 every row pruned; 5, 6 and 7:
        -- 1, 2 and 4 over the kept columns read from the typed rows (typed_rows above:
        -- n.j and o.j are then the kept columns, which hold every key a filter reads).
        FOR variant IN 1..7 LOOP
            CONTINUE WHEN variant > 4 AND typed_rows IS NULL;
            insert_sql := format(
                'WITH n AS MATERIALIZED (SELECT r.j%9$s, %1$s AS k FROM %2$s), '
                '     o AS MATERIALIZED (SELECT r.j%9$s, %1$s AS k FROM %3$s) '
                '%4$s FROM ('
                '  SELECT ''update'' AS op, n.k AS pk, n.%10$s AS new_row, o.%10$s AS old_row, '
                '         NULL::text[] AS changed, 0 AS part '
                '    FROM n JOIN o ON o.k = n.k WHERE n.%10$s IS DISTINCT FROM o.%10$s%5$s '
                '  UNION ALL '
                '  SELECT ''delete'', o.k, NULL, o.%10$s, NULL, 1 FROM o '
                '   WHERE NOT EXISTS (SELECT 1 FROM n WHERE n.k = o.k)%6$s '
                '  UNION ALL '
                '  SELECT ''insert'', n.k, n.%10$s, NULL, NULL, 2 FROM n '
                '   WHERE NOT EXISTS (SELECT 1 FROM o WHERE o.k = n.k)%7$s '
                ') AS c%8$s',
                CASE WHEN variant > 4 THEN 'r.k' ELSE key_expr END,
                format(CASE WHEN variant > 4 THEN typed_rows ELSE rows_json END, 'new_rows'),
                format(CASE WHEN variant > 4 THEN typed_rows ELSE rows_json END, 'old_rows'),
                CASE WHEN variant IN (1, 5) THEN 'SELECT'
                     ELSE format('INSERT INTO crmflow.outbox (entity_type, op, pk, new_row, '
                                 'old_row, changed, depth, actor) '
                                 'SELECT %L, c.op, c.pk, c.new_row, c.old_row, c.changed, %s, %s',
                                 entity, depth_expr, actor_expr) END,
                CASE WHEN variant IN (1, 2, 5, 6) AND f_update <> 'true' THEN ' AND ' || f_update ELSE '' END,
                CASE WHEN variant IN (1, 2, 5, 6) AND f_key_delete <> 'true' THEN ' AND ' || f_key_delete ELSE '' END,
                CASE WHEN variant IN (1, 2, 5, 6) AND f_key_insert <> 'true' THEN ' AND ' || f_key_insert ELSE '' END,
                CASE WHEN variant IN (1, 5) THEN '' ELSE ' ORDER BY c.part' END,
                CASE WHEN variant IN (3, 5, 6, 7) THEN '' ELSE prune_cte END,
                CASE WHEN variant IN (3, 5, 6, 7) THEN 'j' ELSE kept END);
            CASE variant
                WHEN 1 THEN update_probe := insert_sql;
                WHEN 2 THEN update_sql := insert_sql;
                WHEN 3 THEN update_whole := insert_sql;
                WHEN 4 THEN update_pruned := insert_sql;
                WHEN 5 THEN update_typed_probe := insert_sql;
                WHEN 6 THEN update_typed := insert_sql;
                ELSE update_typed_all := insert_sql;
            END CASE;
        END LOOP;
        bodies := bodies || CASE
            WHEN (f_update, f_key_delete, f_key_insert) = ('true', 'true', 'true')
                 AND stored = 'r.j' THEN
                format('BEGIN %s; %s END', update_whole, wake)
            WHEN (f_update, f_key_delete, f_key_insert) = ('true', 'true', 'true')
                 AND typed_same IS NOT NULL THEN
                format('BEGIN IF (%s) IS NOT TRUE THEN %s; ELSIF %s THEN %s; ELSE %s; END IF; '
                       '%s END',
                       guard, update_whole, typed_same, update_typed_all, update_pruned, wake)
            WHEN (f_update, f_key_delete, f_key_insert) = ('true', 'true', 'true') THEN
                format('BEGIN IF (%s) IS NOT TRUE THEN %s; ELSE %s; END IF; %s END',
                       guard, update_whole, update_pruned, wake)
            WHEN (f_update, f_key_delete, f_key_insert) = ('false', 'false', 'false') THEN
                format('BEGIN IF %s THEN NULL; ELSE %s; END IF; %s END', guard, update_whole, wake)
            WHEN typed_same IS NOT NULL THEN
                format('BEGIN IF (%s) IS NOT TRUE THEN %s; '
                       'ELSIF %s THEN IF EXISTS (%s) THEN %s; ELSE RETURN NULL; END IF; '
                       'ELSIF EXISTS (%s) THEN %s; ELSE RETURN NULL; END IF; %s END',
                       guard, update_whole, typed_same, update_typed_probe, update_typed,
                       update_probe, update_sql, wake)
            ELSE format('BEGIN IF (%s) IS NOT TRUE THEN %s; ELSIF EXISTS (%s) THEN %s; '
                        'ELSE RETURN NULL; END IF; %s END',
                        guard, update_whole, update_probe, update_sql, wake)
            END;
        -- insert, update, delete; each headed by the columns the body was made with, so
        -- a heal can tell when the table's columns changed (crmflow.capture_columns_stale).
        bodies := ARRAY[marker || bodies[1], marker || bodies[3], marker || bodies[2]];

        IF attempt = 1 AND NOT EXISTS (
            SELECT 1 FROM unnest(names, bodies) AS b(name, body)
             WHERE NOT EXISTS (SELECT 1 FROM pg_proc AS p
                                WHERE p.oid = to_regprocedure(format('crmflow.%I()', b.name))
                                  AND p.prosrc = b.body AND p.prosecdef))
        THEN
            RETURN;
        END IF;
        EXIT WHEN attempt = 2;
    END LOOP;

    FOR i IN 1..3 LOOP
        -- Pairing sorts or hashes whole captured rows: with the default 4 MB a 1,000-row
        -- update of a 500-column table spilled three sorts to disk (20 MB each).
        EXECUTE format('CREATE OR REPLACE FUNCTION crmflow.%I() RETURNS trigger '
                       'LANGUAGE plpgsql %s %s AS %L', names[i], definer,
                       CASE WHEN i = 2 THEN 'SET work_mem = ''64MB''' ELSE '' END, bodies[i]);
    END LOOP;
END
$generate$;

-- Regenerate the capture of the entities whose workflows changed in this transaction
-- (crmflow.note_capture_change lists them), then take the snapshot of the workflows
-- it activated again (see crmflow.generate_capture). engine/workflows.py calls it at
-- the end of each save, inside its lock-timeout retries; the deferred triggers of
-- migration 0018 call it at commit for any other change (SQL, `unwatch --force`).
-- It runs as crmflow's owner (the runtime role saves workflows, the functions are
-- the owner's); it takes no argument, so it can only regenerate what the workflows
-- say.
CREATE OR REPLACE FUNCTION crmflow.refresh_capture() RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $refresh$
DECLARE
    w record;
    activated bigint[];
BEGIN
    FOR w IN
        SELECT x.entity_type, x.pk_columns
          FROM crmflow.watched_tables AS x
         WHERE x.entity_type = ANY(string_to_array(
                   coalesce(current_setting('crmflow.capture_stale', true), ''), ','))
         ORDER BY x.entity_type
    LOOP
        PERFORM crmflow.generate_capture(w.entity_type, w.pk_columns);
    END LOOP;
    PERFORM set_config('crmflow.capture_stale', '', true);
    activated := ARRAY(SELECT u::bigint FROM unnest(string_to_array(
                           coalesce(current_setting('crmflow.activated', true), ''), ',')) AS u
                        WHERE u ~ '^[0-9]{1,18}$');
    IF cardinality(activated) > 0 THEN
        UPDATE crmflow.workflows SET active_since = pg_current_snapshot()
         WHERE id = ANY(activated) AND status = 'active';
        PERFORM set_config('crmflow.activated', '', true);
    END IF;
END
$refresh$;
REVOKE EXECUTE ON FUNCTION crmflow.refresh_capture() FROM PUBLIC;

-- Row triggers of crmflow.workflows, crmflow.workflow_versions and
-- crmflow.capture_demands: note the entities whose capture may change (the entity of the
-- workflow's current version, before and after; a new version's or demand's entity).
CREATE OR REPLACE FUNCTION crmflow.note_capture_change() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    touched text[];
BEGIN
    IF TG_TABLE_NAME IN ('workflow_versions', 'capture_demands') THEN
        touched := ARRAY[CASE WHEN TG_OP <> 'DELETE' THEN NEW.entity_type END,
                         CASE WHEN TG_OP <> 'INSERT' THEN OLD.entity_type END];
    ELSE
        touched := ARRAY(
            SELECT v.entity_type FROM crmflow.workflow_versions AS v
             WHERE (TG_OP <> 'DELETE' AND v.workflow_id = NEW.id AND v.version = NEW.current_version)
                OR (TG_OP <> 'INSERT' AND v.workflow_id = OLD.id AND v.version = OLD.current_version));
    END IF;
    touched := ARRAY(SELECT DISTINCT e FROM unnest(touched) AS e
                      WHERE e IS NOT NULL
                        AND NOT e = ANY(string_to_array(
                                coalesce(current_setting('crmflow.capture_stale', true), ''), ',')));
    IF cardinality(touched) > 0 THEN
        PERFORM set_config('crmflow.capture_stale',
                           concat_ws(',', nullif(current_setting('crmflow.capture_stale', true), ''),
                                     array_to_string(touched, ',')), true);
    END IF;
    RETURN NULL;
END
$$;

-- The deferred triggers: whatever is still to regenerate when the transaction commits.
CREATE OR REPLACE FUNCTION crmflow.refresh_capture_at_commit() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('crmflow.capture_stale', true), '') <> ''
       OR coalesce(current_setting('crmflow.activated', true), '') <> '' THEN
        PERFORM crmflow.refresh_capture();
    END IF;
    RETURN NULL;
END
$$;

-- Do an entity's filtering capture functions carry another epoch than its sequence's?
CREATE OR REPLACE FUNCTION crmflow.capture_epoch_stale(entity text) RETURNS boolean
    LANGUAGE plpgsql STABLE AS $stale$
DECLARE
    seq regclass := to_regclass(format('crmflow.%I', 'tg_' || entity || '__epoch'));
    now_at bigint;
BEGIN
    IF seq IS NOT NULL THEN
        EXECUTE format('SELECT last_value FROM %s', seq) INTO now_at;
    END IF;
    RETURN EXISTS (
        SELECT 1
          FROM unnest(ARRAY['insert', 'update', 'delete']) AS op(name)
          JOIN pg_proc AS p
            ON p.oid = to_regprocedure(format('crmflow.%I()', 'tg_' || entity || '__' || op.name))
         CROSS JOIN LATERAL regexp_match(p.prosrc, '__epoch''\)\) = ([0-9]+)\)? (IS NOT TRUE )?THEN')
                   AS m(found)
         WHERE m.found IS NOT NULL AND m.found[1]::bigint IS DISTINCT FROM now_at);
END
$stale$;

-- Whether the entity's table no longer has the columns its capture was made with (the
-- marker at the head of each body, crmflow.generate_capture): a column added, renamed or
-- dropped since. Capture stays correct meanwhile (a wide table's typed path checks the
-- columns per statement and falls back to subtracting the pruned names, a new column is
-- kept), only slower and wider, so crmflow.heal_capture regenerates it. NULL when the
-- entity has no table or no capture.
CREATE OR REPLACE FUNCTION crmflow.capture_columns_stale(entity text) RETURNS boolean
    LANGUAGE sql STABLE AS $$
    SELECT NOT p.prosrc LIKE '/* crmflow capture of every column */%'
           AND (regexp_match(p.prosrc, '^/\* crmflow capture of columns ([0-9a-f]{32}) \*/'))[1]
           IS DISTINCT FROM md5(ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute AS a
                                       WHERE a.attrelid = t.rel AND a.attnum > 0
                                         AND NOT a.attisdropped
                                       ORDER BY a.attname)::text)
      FROM crmflow.watched_tables AS w
     CROSS JOIN LATERAL (SELECT to_regclass(format('%I.%I', w.table_schema, w.table_name))) AS t(rel)
      JOIN pg_proc AS p
        ON p.oid = to_regprocedure(format('crmflow.%I()', 'tg_' || entity || '__update'))
     WHERE w.entity_type = entity AND t.rel IS NOT NULL
$$;

-- The table and every partition below it (partitioned ones too: a statement may name
-- any level of the tree).
CREATE OR REPLACE FUNCTION crmflow.capture_tree(root regclass) RETURNS SETOF regclass
    LANGUAGE sql STABLE AS $$
    SELECT tree.rel::regclass
      FROM (SELECT root::oid AS rel
            UNION
            SELECT p.relid FROM pg_partition_tree(root) AS p) AS tree
      JOIN pg_class AS c ON c.oid = tree.rel
     WHERE c.relkind IN ('r', 'p')
     ORDER BY tree.rel
$$;

-- An entity's functions, and its triggers on the table and all its partitions. A
-- trigger is only created where it is missing (CREATE TRIGGER locks the table against
-- writers, so callers bound the wait with lock_timeout).
CREATE OR REPLACE FUNCTION crmflow.install_capture(entity text, root regclass, key_columns text[])
    RETURNS void LANGUAGE plpgsql AS $install$
BEGIN
    PERFORM crmflow.generate_capture(entity, key_columns);
    PERFORM crmflow.attach_capture(entity, rel) FROM crmflow.capture_tree(root) AS rel;
END
$install$;

-- The three triggers of an entity on one table or partition, where missing.
CREATE OR REPLACE FUNCTION crmflow.attach_capture(entity text, rel regclass)
    RETURNS boolean LANGUAGE plpgsql AS $attach$
DECLARE
    op text;
    created boolean := false;
BEGIN
    FOREACH op IN ARRAY ARRAY['insert', 'update', 'delete'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_trigger
                        WHERE tgrelid = rel AND tgname = 'tg_crmflow__' || op) THEN
            EXECUTE format(
                'CREATE TRIGGER %I AFTER %s ON %s REFERENCING %s FOR EACH STATEMENT '
                'EXECUTE FUNCTION crmflow.%I()',
                'tg_crmflow__' || op, upper(op), rel,
                CASE op WHEN 'insert' THEN 'NEW TABLE AS new_rows'
                        WHEN 'update' THEN 'OLD TABLE AS old_rows NEW TABLE AS new_rows'
                        ELSE 'OLD TABLE AS old_rows' END,
                'tg_' || entity || '__' || op);
            created := true;
        END IF;
    END LOOP;
    RETURN created;
END
$attach$;

-- The table an entity's capture is on now: found by its triggers, so a renamed table
-- (or one restored under new OIDs) is still found. The root of the tree when the
-- triggers are on partitions too.
CREATE OR REPLACE FUNCTION crmflow.captured_table(entity text) RETURNS regclass
    LANGUAGE sql STABLE AS $$
    WITH carriers AS (
        SELECT t.tgrelid AS rel
          FROM pg_trigger AS t
         WHERE t.tgname = 'tg_crmflow__insert'
           AND t.tgfoid = to_regprocedure(format('crmflow.%I()', 'tg_' || entity || '__insert'))
    )
    SELECT c.rel::regclass
      FROM carriers AS c
     WHERE NOT EXISTS (SELECT 1 FROM pg_partition_ancestors(c.rel) AS a
                        WHERE a.relid <> c.rel AND a.relid IN (SELECT rel FROM carriers))
     ORDER BY c.rel
     LIMIT 1
$$;

-- Capture heals itself: for every watched table, follow a rename, regenerate the
-- functions when the primary key changed, capture partitions created or attached since,
-- stop capturing partitions detached since. Called by the worker every few seconds, by
-- `crmflow migrate`, and (when crmflow was installed by a superuser) by an event trigger
-- at the end of every ALTER/CREATE TABLE, in the DDL's own transaction, so there is no
-- window at all. Returns what it did or found; nothing when all is well.
-- It never waits long for a table lock: a partition it cannot lock now is tried again.
-- One heal at a time (two would race to create the same trigger): workers skip a round
-- while another heals; the DDL event trigger waits its turn (a worker's heal is short).
CREATE OR REPLACE FUNCTION crmflow.heal_capture(wait boolean DEFAULT false)
    RETURNS TABLE (entity_type text, change text) LANGUAGE plpgsql AS $heal$
DECLARE
    w record;
    root regclass;
    key_now text[];
    schema_now text;
    name_now text;
    rel regclass;
BEGIN
    IF wait THEN
        PERFORM pg_advisory_xact_lock(hashtext('crmflow.heal_capture'));
    ELSIF NOT pg_try_advisory_xact_lock(hashtext('crmflow.heal_capture')) THEN
        RETURN;
    END IF;
    FOR w IN SELECT x.entity_type, x.table_schema, x.table_name, x.pk_columns
               FROM crmflow.watched_tables AS x ORDER BY x.entity_type LOOP
        entity_type := w.entity_type;
        root := crmflow.captured_table(w.entity_type);
        IF root IS NULL THEN
            -- No trigger left: the table was dropped (perhaps made anew under its name).
            root := to_regclass(format('%I.%I', w.table_schema, w.table_name));
            IF root IS NULL THEN
                change := 'table missing';
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;
        SELECT n.nspname, c.relname INTO STRICT schema_now, name_now
          FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
         WHERE c.oid = root;
        IF (schema_now, name_now) IS DISTINCT FROM (w.table_schema, w.table_name) THEN
            UPDATE crmflow.watched_tables AS x
               SET table_schema = schema_now, table_name = name_now
             WHERE x.entity_type = w.entity_type;
            change := format('table is now %I.%I', schema_now, name_now);
            RETURN NEXT;
        END IF;
        key_now := crmflow.primary_key_of(root);
        IF key_now IS NULL THEN
            change := 'no primary key';
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF key_now IS DISTINCT FROM w.pk_columns THEN
            UPDATE crmflow.watched_tables AS x SET pk_columns = key_now
             WHERE x.entity_type = w.entity_type;
            PERFORM crmflow.generate_capture(w.entity_type, key_now);
            change := format('primary key is now (%s)', array_to_string(key_now, ', '));
            RETURN NEXT;
        END IF;
        -- A regeneration that rolled back after using an epoch leaves bodies whose epoch
        -- is not the sequence's: they keep every row (safe, and slow). Made anew here,
        -- when the capture lock is free now (the next round otherwise).
        -- And a table whose columns changed since its capture was made: by the worker's
        -- round only, never in the DDL's own transaction (the event trigger's, `wait`),
        -- where regenerating would hold the DDL's lock on the CRM table, and so the CRM's
        -- writers, longer. Capture is correct meanwhile, only slower and wider.
        IF NOT wait AND crmflow.capture_columns_stale(w.entity_type) IS TRUE THEN
            change := 'capture regenerated (the table''s columns changed)';
        ELSIF crmflow.capture_epoch_stale(w.entity_type) THEN
            change := 'capture filter regenerated (its last change was rolled back)';
        ELSE
            change := NULL;
        END IF;
        IF change IS NOT NULL THEN
            BEGIN
                PERFORM crmflow.generate_capture(w.entity_type, key_now);
                RETURN NEXT;
            EXCEPTION WHEN lock_not_available OR query_canceled OR insufficient_privilege THEN
                NULL;  -- next time
            END;
        END IF;
        -- Partitions (and a table made anew under the name) without the triggers.
        FOR rel IN SELECT t.rel FROM crmflow.capture_tree(root) AS t(rel)
                    WHERE NOT EXISTS (SELECT 1 FROM pg_trigger AS g
                                       WHERE g.tgrelid = t.rel AND g.tgname = 'tg_crmflow__insert')
        LOOP
            BEGIN
                PERFORM crmflow.attach_capture(w.entity_type, rel);
                change := format('%s captured', rel);
            EXCEPTION WHEN lock_not_available OR query_canceled THEN
                change := format('%s is busy; its capture will be retried', rel);
            END;
            RETURN NEXT;
        END LOOP;
        -- Tables that still carry this entity's triggers but left the tree (detached
        -- partitions, a table renamed away and another made under the name).
        FOR rel IN
            SELECT t.tgrelid::regclass FROM pg_trigger AS t
             WHERE t.tgname = 'tg_crmflow__insert'
               AND t.tgfoid = to_regprocedure(format('crmflow.%I()', 'tg_' || w.entity_type || '__insert'))
               AND t.tgrelid <> root
               AND t.tgrelid NOT IN (SELECT p.relid FROM pg_partition_tree(root) AS p)
        LOOP
            BEGIN
                EXECUTE format('DROP TRIGGER IF EXISTS tg_crmflow__insert ON %s; '
                               'DROP TRIGGER IF EXISTS tg_crmflow__update ON %1$s; '
                               'DROP TRIGGER IF EXISTS tg_crmflow__delete ON %1$s', rel);
                change := format('%s is no longer captured (not part of %s)', rel, root);
                RETURN NEXT;
            EXCEPTION WHEN lock_not_available OR query_canceled THEN
                NULL;  -- next time
            END;
        END LOOP;
    END LOOP;
END
$heal$;
