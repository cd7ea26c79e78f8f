-- pg_webhooks: public API (views and functions), roles, grants. Runs last.
-- Every function pins its search_path; operators are resolved from pg_catalog first.

------------------------------------------------------------------------------------------
-- Roles. webhooks_reader reads the logs; webhooks_admin also manages subscriptions.
------------------------------------------------------------------------------------------
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'webhooks_reader') THEN
        CREATE ROLE webhooks_reader NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'webhooks_admin') THEN
        CREATE ROLE webhooks_admin NOLOGIN;
    END IF;
    -- Consumers of poll subscriptions: may call webhooks.poll() for the subscriptions
    -- webhooks.grant_poll() gave them.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'webhooks_consumer') THEN
        CREATE ROLE webhooks_consumer NOLOGIN;
    END IF;
    -- Capture writes events as this role: it can insert events and read its configuration,
    -- nothing else. Nobody logs in as it or is granted it.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'webhooks_capture') THEN
        CREATE ROLE webhooks_capture NOLOGIN NOINHERIT;
    END IF;
END
$$;
GRANT webhooks_reader TO webhooks_admin;
GRANT webhooks_consumer TO webhooks_admin;

-- Matching: webhooks._matches(patterns, filter, event_type, data [, event_names]) is native
-- (src/patterns.rs): fan-out calls it for every event and subscription. API: Private

------------------------------------------------------------------------------------------
-- Capture. API: Public
------------------------------------------------------------------------------------------
CREATE FUNCTION webhooks._singular(word text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN word ~ '(ss|us|is)$' THEN word
        WHEN word ~ 'ies$' THEN regexp_replace(word, 'ies$', 'y')
        WHEN word ~ '(s|x|z|ch|sh)es$' THEN regexp_replace(word, 'es$', '')
        WHEN word ~ '[^s]s$' THEN regexp_replace(word, 's$', '')
        ELSE word
    END
$$;

-- TRUNCATE fires no row triggers: on a tracked table it would remove orders without a single
-- event. Refuse it with a way out. API: Private
CREATE FUNCTION webhooks._refuse_truncate() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'cannot truncate %.%: it is tracked by pg_webhooks and TRUNCATE emits no events',
        TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'object_not_in_prerequisite_state',
              HINT = 'DELETE the rows (each becomes a deleted event), or call webhooks.untrack() first.';
END
$$;

-- track() is this call and nothing else: it hands _track the caller's search_path, so that
-- child table names resolve as the caller wrote them, while _track itself runs with a fixed
-- one (nothing a caller put in a schema on its path can stand in for a function or operator
-- _track uses: a superuser calling track must not run another role's code). Invoker's rights:
-- creating the triggers needs the caller's own TRIGGER privilege; _register_tracked checks
-- the caller's rights again before it writes _tracked.
CREATE FUNCTION webhooks.track(
    tbl regclass,
    entity text DEFAULT NULL,
    key_column name DEFAULT 'id',
    status_column name DEFAULT NULL,
    children jsonb DEFAULT NULL
) RETURNS void
LANGUAGE sql
AS $$
    SELECT webhooks._track(tbl, entity, key_column, status_column, children,
                           pg_catalog.current_setting('search_path'))
$$;

CREATE FUNCTION webhooks._track(
    tbl regclass,
    entity text,
    key_column name,
    status_column name,
    children jsonb,
    caller_search_path text
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_kind     "char";
    v_relname  name;
    v_key      smallint;
    v_status   smallint;
    v_specs    jsonb := '[]'::jsonb;
    v_name     text;
    v_spec     jsonb;
    v_child    regclass;
    v_table    text;
    v_fk       smallint;
    v_lock     oid[];
BEGIN
    IF pg_catalog.current_setting('transaction_isolation') IN ('repeatable read', 'serializable') THEN
        RAISE EXCEPTION 'webhooks.track() runs at READ COMMITTED only' USING ERRCODE = 'invalid_transaction_state',
            HINT = 'At REPEATABLE READ or SERIALIZABLE it would decide from what the snapshot shows of the catalogs.';
    END IF;
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'tbl must not be NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT c.relkind, c.relname INTO v_kind, v_relname FROM pg_catalog.pg_class c WHERE c.oid = tbl;
    IF v_kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '"%" is not a table', tbl USING ERRCODE = 'wrong_object_type';
    END IF;
    -- The table and its children locked before their columns are read (see
    -- _lock_tables_for_tracking), and then the tracking lock, without waiting for one holding
    -- another (see _lock_tables_for_tracking): the table first, then the children in OID
    -- order. The children are checked properly below (a name that now gives another table
    -- fails the track there: 40001). The tracking lock: track, untrack and the drop handler decide
    -- which child triggers to keep from _tracked, one at a time, each seeing what the one
    -- before committed (a lock of the extension's own, which no other role can take: an
    -- advisory one would let any role hold up every DROP).
    v_lock := '{}';
    IF jsonb_typeof(children) = 'object' THEN
        FOR v_name, v_spec IN SELECT * FROM pg_catalog.jsonb_each(children) LOOP
            CONTINUE WHEN jsonb_typeof(v_spec) IS DISTINCT FROM 'object'
                       OR jsonb_typeof(v_spec -> 'table') IS DISTINCT FROM 'string';
            -- (Read here: under the caller's search_path only the cast runs.)
            v_table := v_spec ->> 'table';
            PERFORM pg_catalog.set_config('search_path', caller_search_path, true);
            v_child := v_table::regclass;
            PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
            IF (SELECT c.relkind IN ('r', 'p') AND c.relpersistence <> 't' FROM pg_catalog.pg_class c WHERE c.oid = v_child) THEN
                v_lock := v_lock || v_child::oid;
            END IF;
        END LOOP;
    END IF;
    v_lock := ARRAY[tbl::oid] || ARRAY(SELECT DISTINCT o FROM pg_catalog.unnest(v_lock) o WHERE o <> tbl::oid ORDER BY o);
    PERFORM webhooks._lock_tables_for_tracking(v_lock);
    IF (SELECT c.relforcerowsecurity FROM pg_catalog.pg_class c WHERE c.oid = tbl) THEN
        RAISE EXCEPTION 'table % forces row-level security on its owner', tbl USING ERRCODE = 'feature_not_supported',
            HINT = 'Capture reads as the owner and runs no policy: turn FORCE ROW LEVEL SECURITY off.';
    END IF;
    IF (SELECT c.relpersistence FROM pg_catalog.pg_class c WHERE c.oid = tbl) = 't' THEN
        RAISE EXCEPTION '"%" is a temporary table', tbl USING ERRCODE = 'wrong_object_type',
            HINT = 'Only permanent tables can be tracked.';
    END IF;
    IF EXISTS (SELECT 1 FROM webhooks._tracked t WHERE t.relid = tbl) THEN
        RAISE EXCEPTION 'table % is already tracked', tbl USING ERRCODE = 'duplicate_object',
            HINT = 'Call webhooks.untrack(' || pg_catalog.quote_literal(tbl::text) || ') first to change how it is tracked.';
    END IF;

    entity := coalesce(entity, webhooks._singular(pg_catalog.lower(v_relname)));
    IF entity !~ '^[a-z0-9_-]{1,63}$' THEN
        RAISE EXCEPTION 'invalid entity name "%"', entity USING ERRCODE = 'invalid_parameter_value',
            HINT = 'An entity is one lowercase word such as order; it prefixes the event types (order.created).';
    END IF;
    IF EXISTS (SELECT 1 FROM webhooks._tracked t WHERE t.entity = _track.entity) THEN
        RAISE EXCEPTION 'entity "%" is already used by table %', entity,
            (SELECT t.relid::regclass FROM webhooks._tracked t WHERE t.entity = _track.entity)
            USING ERRCODE = 'duplicate_object',
                  HINT = 'Each tracked table needs an entity of its own: its events are ordered per entity and key.';
    END IF;

    SELECT a.attnum INTO v_key
      FROM pg_catalog.pg_attribute a WHERE a.attrelid = tbl AND a.attname = key_column AND a.attnum > 0 AND NOT a.attisdropped;
    IF v_key IS NULL THEN
        RAISE EXCEPTION 'column "%" does not exist in table %', key_column, tbl USING ERRCODE = 'undefined_column',
            HINT = 'Name the key column with key_column => ''...''.';
    END IF;
    IF (SELECT coalesce(nullif(y.typbasetype, 0), y.oid) FROM pg_catalog.pg_attribute a
          JOIN pg_catalog.pg_type y ON y.oid = a.atttypid WHERE a.attrelid = tbl AND a.attnum = v_key)
       NOT IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype, 'text'::regtype,
               'varchar'::regtype, 'bpchar'::regtype, 'uuid'::regtype)
       OR (SELECT NOT c.collisdeterministic FROM pg_catalog.pg_attribute a
             JOIN pg_catalog.pg_collation c ON c.oid = a.attcollation
            WHERE a.attrelid = tbl AND a.attnum = v_key) THEN
        RAISE EXCEPTION 'key column "%" of table % has type %, which cannot be an event key', key_column, tbl,
            (SELECT format_type(a.atttypid, NULL) FROM pg_catalog.pg_attribute a WHERE a.attrelid = tbl AND a.attnum = v_key)
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Event keys are integers, text (with a deterministic collation) or uuids: one value, one spelling.';
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM pg_catalog.pg_index i
         WHERE i.indrelid = tbl AND i.indisunique AND i.indnkeyatts = 1 AND i.indpred IS NULL
           AND i.indkey[0] = v_key
    ) THEN
        RAISE EXCEPTION 'key column "%" of table % is not unique', key_column, tbl
            USING ERRCODE = 'invalid_column_reference',
            HINT = 'Events are keyed by this column: give it a primary key or a unique index.';
    END IF;
    IF status_column IS NOT NULL THEN
        SELECT a.attnum INTO v_status
          FROM pg_catalog.pg_attribute a WHERE a.attrelid = tbl AND a.attname = status_column AND a.attnum > 0 AND NOT a.attisdropped;
        IF v_status IS NULL THEN
            RAISE EXCEPTION 'column "%" does not exist in table %', status_column, tbl USING ERRCODE = 'undefined_column';
        END IF;
    END IF;

    IF children IS NOT NULL THEN
        IF jsonb_typeof(children) <> 'object' THEN
            RAISE EXCEPTION 'children must be a JSON object' USING ERRCODE = 'invalid_parameter_value',
                HINT = 'Example: ''{"items": {"table": "order_items", "foreign_key": "order_id"}}''';
        END IF;
        FOR v_name, v_spec IN SELECT * FROM pg_catalog.jsonb_each(children) LOOP
            IF jsonb_typeof(v_spec) <> 'object'
               OR jsonb_typeof(v_spec -> 'table') IS DISTINCT FROM 'string'
               OR jsonb_typeof(v_spec -> 'foreign_key') IS DISTINCT FROM 'string'
               OR v_name = '' THEN
                RAISE EXCEPTION 'children entry "%" needs "table" and "foreign_key" strings', v_name
                    USING ERRCODE = 'invalid_parameter_value',
                    HINT = 'Example: ''{"items": {"table": "order_items", "foreign_key": "order_id"}}''';
            END IF;
            -- The name as the caller wrote it, under the caller's search_path (a cast to
            -- regclass looks up a relation and runs nothing else).
            v_table := v_spec ->> 'table';
            PERFORM pg_catalog.set_config('search_path', caller_search_path, true);
            v_child := v_table::regclass;
            PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
            IF (SELECT c.relkind FROM pg_catalog.pg_class c WHERE c.oid = v_child) NOT IN ('r', 'p')
               OR (SELECT c.relpersistence FROM pg_catalog.pg_class c WHERE c.oid = v_child) = 't' THEN
                RAISE EXCEPTION 'child "%" (%) is not a permanent table', v_name, v_child USING ERRCODE = 'wrong_object_type';
            END IF;
            -- Locked above, unless the name now gives another table (one renamed meanwhile),
            -- which track would then wait for holding the tracking lock.
            IF NOT v_child::oid = ANY (v_lock) THEN
                RAISE EXCEPTION 'child "%" is now another table (%) than when track began', v_name, v_child
                    USING ERRCODE = 'serialization_failure', HINT = 'The name gives another table now (one renamed or created meanwhile): retry.';
            END IF;
            IF (SELECT c.relforcerowsecurity FROM pg_catalog.pg_class c WHERE c.oid = v_child) THEN
                RAISE EXCEPTION 'child table % forces row-level security on its owner', v_child
                    USING ERRCODE = 'feature_not_supported',
                          HINT = 'Capture reads as the owner and runs no policy: turn FORCE ROW LEVEL SECURITY off.';
            END IF;
            IF (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = v_child)
               <> (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = tbl) THEN
                RAISE EXCEPTION 'child table % is not owned by the owner of %', v_child, tbl
                    USING ERRCODE = 'insufficient_privilege',
                          HINT = 'Capture reads a table and its children with the rights of their one owner.';
            END IF;
            v_fk := NULL;
            SELECT a.attnum INTO v_fk FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = v_child AND a.attname = (v_spec ->> 'foreign_key') AND a.attnum > 0 AND NOT a.attisdropped;
            IF v_fk IS NULL THEN
                RAISE EXCEPTION 'column "%" does not exist in table %', v_spec ->> 'foreign_key', v_child USING ERRCODE = 'undefined_column';
            END IF;
            -- c.fk = t.key compares within one family of key types (integers; text and
            -- varchar; char; uuid): a built-in operator, no cast a user could have made.
            IF (SELECT CASE WHEN t IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype) THEN 1
                            WHEN t IN ('text'::regtype, 'varchar'::regtype) THEN 2
                            WHEN t = 'bpchar'::regtype THEN 3
                            WHEN t = 'uuid'::regtype THEN 4 END
                  FROM (SELECT coalesce(nullif(y.typbasetype, 0), y.oid)::regtype AS t FROM pg_catalog.pg_attribute a
                          JOIN pg_catalog.pg_type y ON y.oid = a.atttypid WHERE a.attrelid = v_child AND a.attnum = v_fk) f)
               IS DISTINCT FROM
               (SELECT CASE WHEN t IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype) THEN 1
                            WHEN t IN ('text'::regtype, 'varchar'::regtype) THEN 2
                            WHEN t = 'bpchar'::regtype THEN 3
                            WHEN t = 'uuid'::regtype THEN 4 END
                  FROM (SELECT coalesce(nullif(y.typbasetype, 0), y.oid)::regtype AS t FROM pg_catalog.pg_attribute a
                          JOIN pg_catalog.pg_type y ON y.oid = a.atttypid WHERE a.attrelid = tbl AND a.attnum = v_key) k)
            THEN
                RAISE EXCEPTION 'foreign key column "%" of % cannot be compared with key column "%" of %',
                    v_spec ->> 'foreign_key', v_child, key_column, tbl USING ERRCODE = 'datatype_mismatch';
            END IF;
            v_specs := v_specs || jsonb_build_array(jsonb_build_object(
                'name', v_name, 'relid', v_child::oid::bigint, 'fk_attnum', v_fk));
        END LOOP;
    END IF;

    -- The triggers carry no configuration: capture reads _tracked.
    EXECUTE format('CREATE TRIGGER webhooks_capture AFTER INSERT OR UPDATE OR DELETE ON %s
                    FOR EACH ROW EXECUTE FUNCTION webhooks._capture_row()', tbl);
    EXECUTE format('CREATE TRIGGER webhooks_no_truncate BEFORE TRUNCATE ON %s
                    FOR EACH STATEMENT EXECUTE FUNCTION webhooks._refuse_truncate()', tbl);
    -- One child trigger per child table, however many tracked tables list it: capture finds
    -- a child's parents in _tracked.
    FOR v_spec IN SELECT * FROM pg_catalog.jsonb_array_elements(v_specs) LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g
                        WHERE g.tgrelid = (v_spec ->> 'relid')::oid AND g.tgparentid = 0
                          AND g.tgfoid = 'webhooks._capture_child'::regproc) THEN
            EXECUTE format('CREATE TRIGGER %I BEFORE INSERT OR UPDATE OR DELETE ON %s
                            FOR EACH ROW EXECUTE FUNCTION webhooks._capture_child()',
                           'webhooks_child_' || tbl::oid, (v_spec ->> 'relid')::oid::regclass);
        END IF;
    END LOOP;

    PERFORM webhooks._register_tracked(tbl::oid, entity, v_key, v_status, v_specs);

    -- Default lifecycle events for an entity that has no status mapping yet.
    IF status_column IS NOT NULL AND NOT EXISTS (SELECT 1 FROM webhooks.status_events s WHERE s.entity = _track.entity) THEN
        INSERT INTO webhooks.status_events (entity, status, event_type)
        SELECT _track.entity, s, _track.entity || '.' || s
          FROM unnest(ARRAY['paid', 'fulfilled', 'shipped', 'delivered', 'cancelled', 'refunded']) AS s;
        INSERT INTO webhooks.status_events (entity, status, event_type)
        VALUES (_track.entity, 'canceled', _track.entity || '.cancelled');
    END IF;
END
$$;

CREATE FUNCTION webhooks.untrack(tbl regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_children oid[];
    v_trigger  record;
BEGIN
    IF pg_catalog.current_setting('transaction_isolation') IN ('repeatable read', 'serializable') THEN
        RAISE EXCEPTION 'webhooks.untrack() runs at READ COMMITTED only' USING ERRCODE = 'invalid_transaction_state',
            HINT = 'At REPEATABLE READ or SERIALIZABLE it would decide from what the snapshot shows of the catalogs.';
    END IF;
    -- Its tables, then the tracking lock (see _track and _lock_for_untracking).
    PERFORM webhooks._lock_for_untracking(tbl::oid);
    IF tbl IS NULL OR NOT EXISTS (SELECT 1 FROM webhooks._tracked t WHERE t.relid = tbl) THEN
        RAISE EXCEPTION 'table % is not tracked', tbl USING ERRCODE = 'undefined_object';
    END IF;
    SELECT pg_catalog.array_agg((c.value ->> 'relid')::oid) INTO v_children
      FROM webhooks._tracked t, pg_catalog.jsonb_array_elements(t.children) c WHERE t.relid = tbl;
    EXECUTE format('DROP TRIGGER IF EXISTS webhooks_capture ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS webhooks_no_truncate ON %s', tbl);
    PERFORM webhooks._unregister_tracked(tbl::oid);
    -- The child triggers of children no other tracked table lists (whatever their names: a
    -- restored dump's are named after the old cluster's OIDs).
    FOR v_trigger IN
        SELECT g.tgname, g.tgrelid::regclass::text AS rel
          FROM pg_catalog.pg_trigger g
         WHERE g.tgrelid = ANY (v_children) AND g.tgparentid = 0
           AND g.tgfoid = 'webhooks._capture_child'::regproc
           AND NOT EXISTS (SELECT 1 FROM webhooks._tracked t, pg_catalog.jsonb_array_elements(t.children) c
                            WHERE (c.value ->> 'relid')::oid = g.tgrelid)
    LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', v_trigger.tgname, v_trigger.rel);
    END LOOP;
END
$$;

-- Keeps _tracked in step with DDL. It runs for every DROP in the database, by any role, so it
-- runs with the extension owner's rights and touches nothing but the _tracked rows of objects
-- PostgreSQL itself reports as dropped:
--   a tracked table: forgotten (its triggers went with it);
--   its status column: status events stop, other events go on;
--   a child table, or a child's foreign key column: that child leaves the payload;
--   its key column: refused, untrack the table first;
--   and child triggers whose parent or foreign key column went are dropped.
CREATE FUNCTION webhooks._on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_table    text;
    v_trigger  record;
    v_children oid[];
BEGIN
    -- Only a DROP of (a column of) a tracked table or a child concerns _tracked, and only that
    -- one takes the lock (see _track): any role may DROP its own objects in a transaction it
    -- keeps open, and the others' DROPs do not wait for it. Decided on everything committed
    -- (not this transaction's snapshot, which at REPEATABLE READ may predate a track of what
    -- is dropped); a track that has not committed cannot concern it: it locks its tables
    -- before it reads them (_lock_tables_for_tracking), and this DROP holds them.
    IF NOT webhooks._drop_concerns_tracking() THEN
        RETURN;
    END IF;
    -- The children it may drop triggers on, then the tracking lock (see _track).
    PERFORM webhooks._lock_tracking_for_dropping();

    WITH gone AS (
        DELETE FROM webhooks._tracked t
         USING pg_event_trigger_dropped_objects() d
         WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = t.relid AND d.objsubid = 0
        RETURNING t.children
    )
    SELECT array_agg((c.value ->> 'relid')::oid) INTO v_children
      FROM gone, jsonb_array_elements(gone.children) c;

    SELECT t.relid::regclass::text INTO v_table
      FROM webhooks._tracked t, pg_event_trigger_dropped_objects() d
     WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = t.relid AND d.objsubid = t.key_attnum
     LIMIT 1;
    IF v_table IS NOT NULL THEN
        RAISE EXCEPTION 'cannot drop the key column of table %: it is tracked by pg_webhooks', v_table
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = 'Call webhooks.untrack() on the table first.';
    END IF;

    UPDATE webhooks._tracked t SET status_attnum = NULL
      FROM pg_event_trigger_dropped_objects() d
     WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = t.relid AND d.objsubid = t.status_attnum;

    WITH gone AS (
        SELECT d.objid, d.objsubid FROM pg_event_trigger_dropped_objects() d
         WHERE d.classid = 'pg_catalog.pg_class'::regclass
    )
    UPDATE webhooks._tracked t
       SET children = (SELECT coalesce(jsonb_agg(c.value ORDER BY c.ord), '[]'::jsonb)
                         FROM jsonb_array_elements(t.children) WITH ORDINALITY AS c(value, ord)
                        WHERE NOT EXISTS (SELECT 1 FROM gone
                                           WHERE gone.objid = (c.value ->> 'relid')::oid
                                             AND gone.objsubid IN (0, (c.value ->> 'fk_attnum')::int)))
     WHERE EXISTS (SELECT 1 FROM jsonb_array_elements(t.children) c, gone
                    WHERE gone.objid = (c.value ->> 'relid')::oid
                      AND gone.objsubid IN (0, (c.value ->> 'fk_attnum')::int));

    -- Child triggers left behind by what was dropped (their parent, or the child's foreign
    -- key column) would make every write to the child fail: they go too, once no tracked
    -- table lists their table.
    FOR v_trigger IN
        SELECT g.tgname, g.tgrelid::regclass::text AS rel
          FROM pg_trigger g
         WHERE g.tgfoid = 'webhooks._capture_child'::regproc
           AND g.tgparentid = 0  -- clones on partitions go with their parent trigger
           AND (g.tgrelid = ANY (v_children)
                OR g.tgrelid IN (SELECT d.objid FROM pg_event_trigger_dropped_objects() d
                                  WHERE d.classid = 'pg_catalog.pg_class'::regclass))
           AND NOT EXISTS (SELECT 1 FROM webhooks._tracked t, jsonb_array_elements(t.children) c
                            WHERE (c.value ->> 'relid')::oid = g.tgrelid)
    LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', v_trigger.tgname, v_trigger.rel);
    END LOOP;
END
$$;
CREATE EVENT TRIGGER webhooks_forget_dropped_tables ON sql_drop
    EXECUTE FUNCTION webhooks._on_sql_drop();

-- Keeps the configuration by name (child_tables, key_column, status_column, child_fk_columns:
-- what pg_dump keeps) in step with the numbers capture reads (children's OIDs, attribute
-- numbers). Three kinds of INSERT:
--   - names given (a row restored from a dump of 0.2.0 or later): the numbers are this
--     database's, found by those names (pg_dump renumbers columns, leaving dropped ones out);
--   - child_tables given, names not (webhooks.track's registration): names from the numbers;
--   - neither (a row restored from a 0.1.0 dump, whose children are the old cluster's OIDs):
--     its children cannot be matched to tables here; they are left out, with a warning.
-- An UPDATE (sql_drop, renames) takes the names from the numbers.
CREATE FUNCTION webhooks._tracked_by_name() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n int := jsonb_array_length(NEW.children);
BEGIN
    IF TG_OP = 'INSERT' AND NEW.key_column IS NOT NULL THEN
        IF cardinality(NEW.child_tables) <> n OR cardinality(NEW.child_fk_columns) <> n THEN
            RAISE EXCEPTION 'pg_webhooks: the restored configuration of table % is inconsistent', NEW.relid
                USING ERRCODE = 'data_exception', HINT = 'Track the table again after the restore.';
        END IF;
        NEW.key_attnum := (SELECT a.attnum FROM pg_attribute a WHERE a.attrelid = NEW.relid
                              AND a.attname = NEW.key_column AND a.attnum > 0 AND NOT a.attisdropped);
        IF NEW.key_attnum IS NULL THEN
            RAISE EXCEPTION 'pg_webhooks: tracked table % has no column "%" (its key)', NEW.relid, NEW.key_column
                USING ERRCODE = 'undefined_column', HINT = 'Track the table again after the restore.';
        END IF;
        NEW.status_attnum := (SELECT a.attnum FROM pg_attribute a WHERE a.attrelid = NEW.relid
                                 AND a.attname = NEW.status_column AND a.attnum > 0 AND NOT a.attisdropped);
        NEW.children := (SELECT coalesce(jsonb_agg(c.value || jsonb_build_object(
                                    'relid', NEW.child_tables[c.ord]::oid::int8,
                                    'fk_attnum', (SELECT a.attnum FROM pg_attribute a
                                                   WHERE a.attrelid = NEW.child_tables[c.ord]
                                                     AND a.attname = NEW.child_fk_columns[c.ord]
                                                     AND a.attnum > 0 AND NOT a.attisdropped))
                                    ORDER BY c.ord), '[]')
                           FROM jsonb_array_elements(NEW.children) WITH ORDINALITY AS c(value, ord));
        IF EXISTS (SELECT 1 FROM jsonb_array_elements(NEW.children) c WHERE c.value -> 'fk_attnum' = 'null') THEN
            RAISE EXCEPTION 'pg_webhooks: a child table of % lacks its foreign key column', NEW.relid
                USING ERRCODE = 'undefined_column', HINT = 'Track the table again after the restore.';
        END IF;
        RETURN NEW;
    END IF;
    IF TG_OP = 'INSERT' AND cardinality(NEW.child_tables) <> n THEN
        RAISE WARNING 'pg_webhooks: table % was dumped by pg_webhooks 0.1.0: its % child table(s) cannot be matched to this database''s tables and are left out of its events', NEW.relid, n
            USING HINT = 'Call webhooks.untrack() and webhooks.track() with its children again.';
        NEW.children := '[]';
        NEW.child_tables := '{}';
    END IF;
    NEW.child_tables := ARRAY(SELECT (c.value ->> 'relid')::oid::regclass
                                FROM jsonb_array_elements(NEW.children) WITH ORDINALITY AS c(value, ord)
                               ORDER BY c.ord);
    NEW.key_column := (SELECT a.attname FROM pg_attribute a WHERE a.attrelid = NEW.relid AND a.attnum = NEW.key_attnum);
    NEW.status_column := (SELECT a.attname FROM pg_attribute a WHERE a.attrelid = NEW.relid AND a.attnum = NEW.status_attnum);
    NEW.child_fk_columns := ARRAY(SELECT a.attname
                                    FROM jsonb_array_elements(NEW.children) WITH ORDINALITY AS c(value, ord)
                                    JOIN pg_attribute a ON a.attrelid = (c.value ->> 'relid')::oid
                                                       AND a.attnum = (c.value ->> 'fk_attnum')::int2
                                   ORDER BY c.ord);
    RETURN NEW;
END
$$;
CREATE TRIGGER tracked_by_name BEFORE INSERT OR UPDATE ON webhooks._tracked
    FOR EACH ROW EXECUTE FUNCTION webhooks._tracked_by_name();

-- Renames of a tracked table's or a child's columns: the names kept for pg_dump follow (the
-- numbers capture reads do not change). Runs for ALTER TABLE by any role, so with the
-- extension owner's rights, touching nothing but the _tracked rows of the tables altered.
CREATE FUNCTION webhooks._on_ddl_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM webhooks._tracked) THEN
        RETURN;
    END IF;
    UPDATE webhooks._tracked t SET key_attnum = t.key_attnum
     WHERE EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands() d
                    WHERE d.classid = 'pg_catalog.pg_class'::regclass
                      AND (d.objid = t.relid OR d.objid = ANY (t.child_tables::oid[])));
END
$$;
CREATE EVENT TRIGGER webhooks_follow_renames ON ddl_command_end WHEN TAG IN ('ALTER TABLE')
    EXECUTE FUNCTION webhooks._on_ddl_end();

------------------------------------------------------------------------------------------
-- Subscriptions. API: Public
------------------------------------------------------------------------------------------
-- A subscription restored from a dump of another cluster carries that cluster's creation
-- snapshot. One from this cluster can never lie ahead of its current snapshot; one that does
-- would count every event here as committed before it, and receive nothing: it is created
-- anew, as a new subscription would be (receiving what commits after the restore).
CREATE FUNCTION webhooks._subscription_restored() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_snapshot_xmax(NEW.created_snapshot) > pg_snapshot_xmax(pg_current_snapshot()) THEN
        NEW.created_snapshot := pg_current_snapshot();
        NEW.fanned_out := false;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER subscription_restored BEFORE INSERT ON webhooks._subscriptions
    FOR EACH ROW EXECUTE FUNCTION webhooks._subscription_restored();

CREATE FUNCTION webhooks._subscription_exists(p_id bigint) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_id IS NULL OR NOT EXISTS (SELECT 1 FROM webhooks._subscriptions s WHERE s.id = p_id) THEN
        RAISE EXCEPTION 'subscription % does not exist', coalesce(p_id::text, 'NULL') USING ERRCODE = 'no_data_found';
    END IF;
END
$$;

CREATE FUNCTION webhooks._check_headers(headers jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_name text;
    v_type text;
BEGIN
    IF headers IS NULL OR jsonb_typeof(headers) <> 'object' THEN
        RAISE EXCEPTION 'headers must be a JSON object of strings' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Example: ''{"Authorization": "Bearer ..."}''';
    END IF;
    FOR v_name, v_type IN SELECT key, jsonb_typeof(value) FROM jsonb_each(headers) LOOP
        IF v_type <> 'string' THEN
            RAISE EXCEPTION 'header "%" must have a string value', v_name USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF v_name !~ '^[A-Za-z0-9!#$%&''*+.^_`|~-]+$' THEN
            RAISE EXCEPTION 'invalid header name "%"', v_name USING ERRCODE = 'invalid_parameter_value';
        END IF;
        -- CR, LF and other control characters (tab aside) would split or break the request:
        -- refused here rather than failing every delivery.
        IF (headers ->> v_name) ~ '[\x01-\x08\x0a-\x1f\x7f]' THEN
            RAISE EXCEPTION 'header "%" has a control character (such as CR or LF) in its value', v_name
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF octet_length(headers ->> v_name) > 8192 THEN
            RAISE EXCEPTION 'header "%" has a value longer than 8192 bytes', v_name
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF lower(v_name) IN ('host', 'content-length', 'content-type', 'transfer-encoding', 'connection',
                             'webhook-id', 'webhook-timestamp', 'webhook-signature') THEN
            RAISE EXCEPTION 'header "%" is set by pg_webhooks and cannot be overridden', v_name
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
END
$$;

-- subscribe's parameter `secret` has the name of its result column, which PL/pgSQL does not
-- allow: subscribe is a SQL function handing its arguments to _subscribe. API: Private
CREATE FUNCTION webhooks._subscribe(
    p_url text, p_event_types text[], p_description text, p_headers jsonb, p_filter jsonb,
    p_signature text, p_signature_header text, p_timeout interval, p_retry_schedule text,
    p_secret text, p_signature_options jsonb, p_tls jsonb, p_shape jsonb, p_delivery text
) RETURNS TABLE (o_id bigint, o_secret text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_url    text;
    v_id     bigint;
    v_secret text := p_secret;
    v_sig    jsonb;
    v_tls    jsonb;
BEGIN
    IF p_delivery IS NULL OR p_delivery NOT IN ('push', 'poll') THEN
        RAISE EXCEPTION 'delivery must be ''push'' or ''poll''' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'push: the worker POSTs each event to url. poll: a consumer takes them with webhooks.poll().';
    END IF;
    IF p_delivery = 'poll' THEN
        -- Nothing is sent: what only shapes a request would be silently ignored.
        IF p_url IS NOT NULL THEN
            RAISE EXCEPTION 'a poll subscription has no url' USING ERRCODE = 'invalid_parameter_value',
                HINT = 'Pass url => NULL with delivery => ''poll''; its consumer calls webhooks.poll().';
        END IF;
        IF p_headers IS DISTINCT FROM '{}'::jsonb OR p_signature IS DISTINCT FROM 'standard'
           OR p_signature_header IS NOT NULL OR p_timeout IS NOT NULL OR p_retry_schedule IS NOT NULL
           OR p_secret IS NOT NULL OR p_signature_options IS NOT NULL OR p_tls IS NOT NULL THEN
            RAISE EXCEPTION 'headers, signature, signature_header, timeout, retry_schedule, secret, signature_options and tls apply to push subscriptions only'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    ELSE
        IF p_url IS NULL OR btrim(p_url) = '' THEN
            RAISE EXCEPTION 'url must not be empty' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        v_url := webhooks._check_url(p_url);
    END IF;
    IF p_event_types IS NULL THEN
        RAISE EXCEPTION 'event_types must not be NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_shape IS NULL THEN
        PERFORM webhooks._check_event_patterns(p_event_types);
    END IF;
    PERFORM webhooks._check_headers(p_headers);
    IF p_filter IS NOT NULL AND jsonb_typeof(p_filter) <> 'object' THEN
        RAISE EXCEPTION 'filter must be a JSON object' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'The filter is matched by containment against the event data, e.g. ''{"currency": "EUR"}''.';
    END IF;
    -- The style with its header and options, normalized (src/api.rs _check_signature).
    v_sig := webhooks._check_signature(p_signature, p_signature_header, p_signature_options::text);
    IF p_timeout IS NOT NULL AND (p_timeout < interval '1 millisecond' OR p_timeout > interval '10 minutes') THEN
        RAISE EXCEPTION 'timeout must be between 1 millisecond and 10 minutes' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_retry_schedule IS NOT NULL THEN
        PERFORM webhooks._check_retry_schedule(p_retry_schedule);
    END IF;
    IF v_secret IS NULL THEN
        v_secret := webhooks._generate_secret();
    ELSE
        PERFORM webhooks._check_secret(p_signature, v_secret);
    END IF;
    IF p_tls IS NOT NULL THEN
        v_tls := webhooks._check_tls(p_tls::text, v_url);
    END IF;
    IF p_shape IS NOT NULL THEN
        -- The shape, the patterns that may name its renamed types, and its headers against
        -- the subscription's own (custom, signature and timestamp headers).
        PERFORM webhooks._check_shape(p_shape::text, p_event_types,
            ARRAY(SELECT jsonb_object_keys(p_headers)) || (v_sig ->> 'signature_header')
                || (v_sig -> 'signature_options' ->> 'timestamp_header'));
    END IF;

    INSERT INTO webhooks._subscriptions (url, event_types, description, filter, signature, signature_header,
                                         timeout, retry_schedule, shape, delivery, signature_options, tls)
    VALUES (v_url, p_event_types, p_description, p_filter, p_signature, v_sig ->> 'signature_header',
            p_timeout, p_retry_schedule, p_shape, p_delivery, NULLIF(v_sig -> 'signature_options', 'null'), v_tls)
    RETURNING _subscriptions.id INTO v_id;
    INSERT INTO webhooks._secrets (subscription_id, secret, headers, tls) VALUES (v_id, v_secret, p_headers, p_tls);
    RETURN QUERY SELECT v_id, v_secret;
END
$$;

CREATE FUNCTION webhooks.subscribe(
    url text,
    event_types text[] DEFAULT '{*}',
    description text DEFAULT NULL,
    headers jsonb DEFAULT '{}',
    filter jsonb DEFAULT NULL,
    signature text DEFAULT 'standard',
    signature_header text DEFAULT NULL,
    timeout interval DEFAULT NULL,
    retry_schedule text DEFAULT NULL,
    secret text DEFAULT NULL,
    signature_options jsonb DEFAULT NULL,
    tls jsonb DEFAULT NULL,
    shape jsonb DEFAULT NULL,
    delivery text DEFAULT 'push'
) RETURNS TABLE (id bigint, secret text)
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.o_id, s.o_secret
      FROM webhooks._subscribe(url, event_types, description, headers, filter, signature, signature_header,
                               timeout, retry_schedule, secret, signature_options, tls, shape, delivery) AS s
$$;

-- Change (or, with NULL, remove) a subscription's request shape; deliveries attempted from
-- now on are shaped by it. Checked as subscribe checks it, against the subscription's
-- event_types, custom headers and signature header.
CREATE FUNCTION webhooks.set_shape(id bigint, shape jsonb) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p_id  bigint := id;
    v_sub webhooks._subscriptions;
BEGIN
    SELECT * INTO v_sub FROM webhooks._subscriptions s WHERE s.id = p_id FOR NO KEY UPDATE;
    -- After the lock, in a new snapshot: also a subscription an unsubscribe removed meanwhile.
    PERFORM webhooks._subscription_exists(p_id);
    IF shape IS NULL THEN
        PERFORM webhooks._check_event_patterns(v_sub.event_types);
    ELSE
        PERFORM webhooks._check_shape(shape::text, v_sub.event_types,
            ARRAY(SELECT jsonb_object_keys(k.headers) FROM webhooks._secrets k WHERE k.subscription_id = p_id)
            || v_sub.signature_header || (v_sub.signature_options ->> 'timestamp_header'));
    END IF;
    UPDATE webhooks._subscriptions s SET shape = set_shape.shape, updated_at = now() WHERE s.id = p_id;
END
$$;

CREATE FUNCTION webhooks._set_state(p_id bigint, p_state text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM webhooks._subscription_exists(p_id);
    UPDATE webhooks._subscriptions s
       SET state = p_state, updated_at = now(),
           disabled_reason = CASE WHEN p_state = 'active' THEN NULL ELSE s.disabled_reason END,
           failing_since = CASE WHEN p_state = 'active' THEN NULL ELSE s.failing_since END
     WHERE s.id = p_id;
    IF p_state = 'active' THEN
        -- Held deliveries flow again now: those waiting for a retry are due at once (only
        -- heads ever wait for a time; the others are already due, and are not rewritten, so
        -- resuming a backlog of a million costs an index probe, not a million updates).
        UPDATE webhooks._queue q SET next_attempt_at = now()
         WHERE q.subscription_id = p_id AND q.head AND q.next_attempt_at > now();
        PERFORM webhooks._wake_worker_at_commit();
    END IF;
END
$$;

CREATE FUNCTION webhooks.pause(id bigint) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT webhooks._set_state(id, 'paused') $$;

CREATE FUNCTION webhooks.resume(id bigint) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT webhooks._set_state(id, 'active') $$;

CREATE FUNCTION webhooks.unsubscribe(id bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p_id bigint := id;
BEGIN
    PERFORM webhooks._subscription_exists(p_id);
    -- The subscription's row first, as the worker's record of outcomes takes it first (that
    -- statement's UPDATE of the subscription runs before its queue and delivery changes):
    -- taking the queue rows before it deadlocked with a record of a failing endpoint.
    PERFORM 1 FROM webhooks._subscriptions s WHERE s.id = p_id FOR UPDATE;
    -- The history stays; what was still queued ends as dead with a reason. Queue rows next,
    -- in the worker's order (it deletes a queue row, then updates its delivery), and only
    -- deliveries that have not ended meanwhile. Deliveries queued by transactions that commit
    -- after this one (a fan-out, send_test or replay racing it) are ended by the worker.
    WITH q AS (
        DELETE FROM webhooks._queue q WHERE q.subscription_id = p_id RETURNING q.delivery_id
    )
    UPDATE webhooks._deliveries d
       SET status = 'dead', last_error = 'subscription removed', next_attempt_at = NULL
      FROM q
     WHERE d.id = q.delivery_id AND d.status NOT IN ('succeeded', 'dead');
    DELETE FROM webhooks._subscriptions s WHERE s.id = p_id;
END
$$;

CREATE FUNCTION webhooks.rotate_secret(id bigint, grace interval DEFAULT '24 hours', secret text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p_id     bigint := id;
    v_secret text := rotate_secret.secret;
BEGIN
    PERFORM webhooks._subscription_exists(p_id);
    IF grace IS NULL OR grace < interval '0' OR grace > interval '30 days' THEN
        RAISE EXCEPTION 'grace must be between 0 and 30 days' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_secret IS NULL THEN
        v_secret := webhooks._generate_secret();
    ELSE
        PERFORM webhooks._check_secret((SELECT s.signature FROM webhooks._subscriptions s WHERE s.id = p_id), v_secret);
    END IF;
    UPDATE webhooks._secrets k
       SET previous_secret = CASE WHEN grace > interval '0' THEN k.secret END,
           previous_expires_at = CASE WHEN grace > interval '0' THEN now() + grace END,
           secret = v_secret
     WHERE k.subscription_id = p_id;
    UPDATE webhooks._subscriptions s SET updated_at = now() WHERE s.id = p_id;
    RETURN v_secret;
END
$$;

-- A subscription's signature style, header and options, validated as subscribe does. The
-- secrets stay; a switch to 'standard' needs secrets in its form (whsec_ + base64), the
-- previous one too while its grace lasts. API: Public
CREATE FUNCTION webhooks.set_signature(
    id bigint,
    signature text,
    signature_header text DEFAULT NULL,
    signature_options jsonb DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p_id  bigint := id;
    v_sig jsonb;
    v_key webhooks._secrets;
    v_delivery webhooks._subscriptions.delivery%TYPE;
BEGIN
    -- The row first, as set_shape takes it: the shape and the signature's headers are checked
    -- against each other, so two of them at once must not each check the other's old value.
    SELECT s.delivery INTO v_delivery FROM webhooks._subscriptions s WHERE s.id = p_id FOR NO KEY UPDATE;
    -- After the lock, in a new snapshot: also a subscription an unsubscribe removed meanwhile.
    PERFORM webhooks._subscription_exists(p_id);
    IF v_delivery = 'poll' THEN
        RAISE EXCEPTION 'subscription % is a poll subscription: nothing of it is signed', p_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_sig := webhooks._check_signature(signature, signature_header, signature_options::text);
    SELECT * INTO v_key FROM webhooks._secrets k WHERE k.subscription_id = p_id FOR UPDATE;
    -- The shape's headers must not collide with the new signature's.
    PERFORM webhooks._check_shape(sub.shape::text, sub.event_types,
                ARRAY(SELECT jsonb_object_keys(v_key.headers)) || (v_sig ->> 'signature_header')
                    || (v_sig -> 'signature_options' ->> 'timestamp_header'))
       FROM webhooks._subscriptions sub WHERE sub.id = p_id AND sub.shape IS NOT NULL;
    BEGIN
        PERFORM webhooks._check_secret(signature, v_key.secret);
        IF v_key.previous_expires_at > now() THEN
            PERFORM webhooks._check_secret(signature, v_key.previous_secret);
        END IF;
    EXCEPTION WHEN invalid_parameter_value THEN
        RAISE EXCEPTION 'the subscription''s secret cannot sign with signature => ''%''', signature
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Rotate to a secret of that style first: webhooks.rotate_secret(id, ''0'', secret => ...), or without secret for a new whsec_ one.';
    END;
    UPDATE webhooks._subscriptions s
       SET signature = set_signature.signature,
           signature_header = v_sig ->> 'signature_header',
           signature_options = NULLIF(v_sig -> 'signature_options', 'null'),
           updated_at = now()
     WHERE s.id = p_id;
END
$$;

-- A subscription's TLS settings (NULL: none, the public roots and no client certificate),
-- validated as subscribe does; the worker makes its connections anew with them. API: Public
CREATE FUNCTION webhooks.set_tls(id bigint, tls jsonb) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p_id  bigint := id;
    v_tls jsonb;
BEGIN
    PERFORM webhooks._subscription_exists(p_id);
    IF tls IS NOT NULL THEN
        v_tls := webhooks._check_tls(set_tls.tls::text, (SELECT s.url FROM webhooks._subscriptions s WHERE s.id = p_id));
    END IF;
    UPDATE webhooks._secrets k SET tls = set_tls.tls WHERE k.subscription_id = p_id;
    UPDATE webhooks._subscriptions s SET tls = v_tls, updated_at = now() WHERE s.id = p_id;
END
$$;

-- A delivery outside the per-key order (tests and redeliveries do not wait behind the live
-- queue), due now; the worker is woken at commit. API: Private
CREATE FUNCTION webhooks._enqueue_unordered(p_event_seq bigint, p_subscription bigint, p_redelivery_of bigint)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id bigint;
BEGIN
    INSERT INTO webhooks._deliveries (event_seq, subscription_id, next_attempt_at, redelivery_of)
    VALUES (p_event_seq, p_subscription, now(), p_redelivery_of) RETURNING id INTO v_id;
    INSERT INTO webhooks._queue (delivery_id, subscription_id, event_seq) VALUES (v_id, p_subscription, p_event_seq);
    PERFORM webhooks._wake_worker_at_commit();
    RETURN v_id;
END
$$;

-- A sample value of a column for send_test: synthesized from the column's type (and, for a
-- few common text columns, its name), never read from a row, so that no customer's data
-- reaches a test endpoint and an empty table gives samples too. Built-in types only: a value
-- of a type a user made would need its input function or a cast (somebody's code, run with
-- the extension's rights), so such a column (other than an enum) is null. `p_n` numbers the
-- row (1 for the entity, 1, 2 for its children); `p_key`: the row's key column. Values are
-- written under the settings capture writes payloads with. API: Private
CREATE FUNCTION webhooks._sample_value(p_name name, p_type oid, p_typmod integer, p_n integer, p_key boolean)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC' SET DateStyle = 'ISO, MDY' SET IntervalStyle = 'postgres' SET extra_float_digits = 1
SET bytea_output = 'hex'
AS $$
DECLARE
    v_type   oid := p_type;
    v_typmod integer := p_typmod;
    v_kind   "char";
    v_cat    "char";
    v_base   oid;
    v_bmod   integer;
    v_name   text := lower(p_name);
    v_text   text;
BEGIN
    FOR i IN 1..50 LOOP  -- domains over domains: their base type
        SELECT t.typtype, t.typcategory, t.typbasetype, t.typtypmod INTO v_kind, v_cat, v_base, v_bmod
          FROM pg_type t WHERE t.oid = v_type;
        EXIT WHEN v_kind IS DISTINCT FROM 'd';
        v_type := v_base;
        v_typmod := v_bmod;
    END LOOP;
    IF v_kind = 'e' THEN
        RETURN (SELECT to_jsonb(e.enumlabel::text) FROM pg_enum e WHERE e.enumtypid = v_type ORDER BY e.enumsortorder LIMIT 1);
    END IF;
    IF v_cat = 'A' THEN
        RETURN '[]';
    END IF;
    CASE v_type
    WHEN 'int2'::regtype, 'int4'::regtype, 'int8'::regtype THEN
        RETURN to_jsonb(p_n);
    WHEN 'numeric'::regtype THEN
        -- numeric(p, s): as many decimals as the column keeps (59.90, not 59.9).
        RETURN to_jsonb(CASE WHEN v_typmod >= 4 THEN round(29.95 * p_n, ((v_typmod - 4) & 65535)) ELSE 29.95 * p_n END);
    WHEN 'float4'::regtype, 'float8'::regtype THEN
        RETURN to_jsonb(29.95::float8 * p_n);
    WHEN 'bool'::regtype THEN
        RETURN 'true';
    WHEN 'uuid'::regtype THEN
        RETURN to_jsonb(gen_random_uuid());
    WHEN 'date'::regtype THEN
        RETURN to_jsonb(current_date);
    WHEN 'timestamptz'::regtype THEN
        RETURN to_jsonb(now());
    WHEN 'timestamp'::regtype THEN
        RETURN to_jsonb(localtimestamp);
    WHEN 'time'::regtype THEN
        RETURN to_jsonb(localtime);
    WHEN 'timetz'::regtype THEN
        RETURN to_jsonb(current_time);
    WHEN 'interval'::regtype THEN
        RETURN to_jsonb(interval '1 day');
    WHEN 'json'::regtype, 'jsonb'::regtype THEN
        RETURN '{}';
    WHEN 'inet'::regtype, 'cidr'::regtype THEN
        RETURN to_jsonb('192.0.2.1'::text);
    WHEN 'bytea'::regtype THEN
        RETURN to_jsonb('\x00'::bytea);
    WHEN 'text'::regtype, 'varchar'::regtype, 'bpchar'::regtype, 'name'::regtype THEN
        v_text := CASE
            WHEN p_key THEN 'sample-' || p_n
            WHEN v_name LIKE '%email%' THEN 'customer' || p_n || '@example.com'
            WHEN v_name LIKE '%phone%' THEN '+15555550' || lpad(p_n::text, 3, '0')
            WHEN v_name LIKE '%currency%' THEN 'EUR'
            WHEN v_name LIKE '%country%' THEN 'DE'
            WHEN v_name LIKE '%sku%' THEN 'SKU-' || lpad(p_n::text, 4, '0')
            WHEN v_name LIKE '%url%' THEN 'https://example.com/' || p_n
            WHEN v_name LIKE '%status%' THEN 'pending'
            WHEN v_name LIKE '%name%' OR v_name LIKE '%customer%' THEN 'Ada Lovelace'
            ELSE 'sample ' || p_name
        END;
        -- varchar(n) / char(n): no longer than the column allows.
        IF v_type IN ('varchar'::regtype, 'bpchar'::regtype) AND v_typmod > 4 THEN
            v_text := left(v_text, v_typmod - 4);
        END IF;
        RETURN to_jsonb(v_text);
    ELSE
        RETURN 'null';
    END CASE;
END
$$;

-- One sample row of table p_rel as capture writes a row (its columns by name): p_key_attnum
-- gets p_n (or its type's sample key), p_fk_attnum the parent's key p_parent, p_status_attnum
-- the status p_status. API: Private
CREATE FUNCTION webhooks._sample_row(p_rel oid, p_n integer, p_key_attnum smallint, p_fk_attnum smallint,
                                     p_parent jsonb, p_status_attnum smallint, p_status text)
RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(jsonb_object_agg(a.attname,
               CASE WHEN a.attnum = p_fk_attnum THEN p_parent
                    WHEN a.attnum = p_status_attnum AND p_status IS NOT NULL THEN to_jsonb(p_status)
                    ELSE webhooks._sample_value(a.attname, a.atttypid, a.atttypmod, p_n, a.attnum = p_key_attnum) END
               ORDER BY a.attnum), '{}'::jsonb)
      FROM pg_attribute a
     WHERE a.attrelid = p_rel AND a.attnum > 0 AND NOT a.attisdropped
$$;

-- The event types capture can write for the tracked tables, with what each is made of: the
-- table, the kind of change and, for status events, the status. API: Private
CREATE FUNCTION webhooks._sample_types()
RETURNS TABLE (event_type text, relid oid, kind text, status text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT t.entity || '.' || k.kind, t.relid::oid, k.kind, NULL::text
      FROM webhooks._tracked t
     CROSS JOIN (VALUES ('created'), ('updated'), ('deleted'), ('status_updated')) AS k(kind)
     WHERE k.kind <> 'status_updated' OR t.status_attnum IS NOT NULL
    UNION ALL
    -- A type that several statuses map to (cancelled, canceled): the status named like it.
    (SELECT DISTINCT ON (m.event_type) m.event_type, t.relid::oid, 'status', m.status
       FROM webhooks._tracked t JOIN webhooks.status_events m ON m.entity = t.entity
      WHERE t.status_attnum IS NOT NULL
      ORDER BY m.event_type, m.entity || '.' || m.status <> m.event_type, m.status)
    ORDER BY 1
$$;

-- A realistic sample of event type p_type of a tracked table, as capture would write it: the
-- row (synthesized, see _sample_value) with its children (two rows each) for created, updated
-- and status events, previous_status and status for status events, the row alone for deleted.
-- An unknown type: 22023, with the valid ones in the hint. API: Private
CREATE FUNCTION webhooks._sample(p_type text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_t        record;
    v_tracked  webhooks._tracked;
    v_key      jsonb;
    v_status   text;
    v_previous text;
    v_labels   text[];
    v_data     jsonb;
    v_children jsonb := '{}';
    v_child    record;
    v_child_pk smallint;
    v_type     oid;
BEGIN
    SELECT * INTO v_t FROM webhooks._sample_types() s WHERE s.event_type = p_type LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no tracked table has events of type "%"', left(p_type, 200)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = coalesce('Valid types: webhook.test, '
                                  || left((SELECT string_agg(s.event_type, ', ' ORDER BY s.event_type)
                                             FROM webhooks._sample_types() s), 2000) || '.',
                                  'No table is tracked: only webhook.test can be sent (webhooks.track() a table first).');
    END IF;
    SELECT * INTO v_tracked FROM webhooks._tracked t WHERE t.relid = v_t.relid;
    v_key := webhooks._sample_value(
        (SELECT a.attname FROM pg_attribute a WHERE a.attrelid = v_t.relid AND a.attnum = v_tracked.key_attnum),
        (SELECT a.atttypid FROM pg_attribute a WHERE a.attrelid = v_t.relid AND a.attnum = v_tracked.key_attnum),
        (SELECT a.atttypmod FROM pg_attribute a WHERE a.attrelid = v_t.relid AND a.attnum = v_tracked.key_attnum),
        1001, true);
    IF v_tracked.status_attnum IS NOT NULL THEN
        -- An enum status column offers its labels; otherwise the statuses status_events maps.
        SELECT a.atttypid INTO v_type FROM pg_attribute a
         WHERE a.attrelid = v_t.relid AND a.attnum = v_tracked.status_attnum;
        FOR i IN 1..50 LOOP  -- a domain's base type
            EXIT WHEN (SELECT t.typtype FROM pg_type t WHERE t.oid = v_type) IS DISTINCT FROM 'd';
            v_type := (SELECT t.typbasetype FROM pg_type t WHERE t.oid = v_type);
        END LOOP;
        SELECT array_agg(e.enumlabel::text ORDER BY e.enumsortorder) INTO v_labels
          FROM pg_enum e WHERE e.enumtypid = v_type;
        v_previous := coalesce(v_labels[1], 'pending');
        v_status := CASE
            WHEN v_t.kind = 'status' THEN v_t.status
            WHEN v_t.kind = 'status_updated' THEN
                 coalesce(v_labels[2],
                          (SELECT m.status FROM webhooks.status_events m
                            WHERE m.entity = v_tracked.entity AND m.status <> v_previous
                            ORDER BY m.status <> 'paid', m.status LIMIT 1),
                          'paid')
            ELSE v_previous END;
        IF v_previous = v_status THEN
            v_previous := coalesce((SELECT l FROM unnest(v_labels) l WHERE l <> v_status LIMIT 1), 'pending');
        END IF;
    END IF;
    v_data := webhooks._sample_row(v_t.relid, 1, v_tracked.key_attnum, NULL, NULL,
                                   v_tracked.status_attnum, v_status);
    -- The key column holds the sample key (1001 as a number of the key's type).
    v_data := v_data || jsonb_build_object(
        (SELECT a.attname FROM pg_attribute a WHERE a.attrelid = v_t.relid AND a.attnum = v_tracked.key_attnum)::text, v_key);
    IF v_t.kind = 'deleted' THEN
        RETURN v_data;  -- a deleted row comes without its children
    END IF;
    FOR v_child IN
        SELECT c.value ->> 'name' AS name, (c.value ->> 'relid')::oid AS relid, (c.value ->> 'fk_attnum')::smallint AS fk
          FROM jsonb_array_elements(v_tracked.children) WITH ORDINALITY AS c(value, ord) ORDER BY c.ord
    LOOP
        SELECT i.indkey[0] INTO v_child_pk FROM pg_index i
         WHERE i.indrelid = v_child.relid AND i.indisprimary AND i.indnatts = 1;
        v_children := v_children || jsonb_build_object(v_child.name, (
            SELECT jsonb_agg(webhooks._sample_row(v_child.relid, n, v_child_pk, v_child.fk, v_key, NULL, NULL) ORDER BY n)
              FROM generate_series(1, 2) n));
    END LOOP;
    v_data := v_data || v_children;
    IF v_t.kind IN ('status_updated', 'status') THEN
        v_data := v_data || jsonb_build_object('previous_status', v_previous, 'status', v_status);
    END IF;
    RETURN v_data;
END
$$;

CREATE FUNCTION webhooks.send_test(id bigint, event_type text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p_id   bigint := id;
    p_type text := coalesce(event_type, 'webhook.test');
    v_data jsonb;
    v_sub  webhooks._subscriptions;
    v_seq  bigint;
    v_at   timestamptz;
BEGIN
    PERFORM webhooks._subscription_exists(p_id);
    IF p_type = 'webhook.test' THEN
        v_data := jsonb_build_object('subscription_id', p_id, 'message', 'This is a test delivery from pg_webhooks.');
    ELSE
        v_data := webhooks._sample(p_type);
        SELECT * INTO v_sub FROM webhooks._subscriptions s WHERE s.id = p_id;
        IF NOT webhooks._matches(v_sub.event_types, v_sub.filter, p_type, v_data, v_sub.shape -> 'event_names') THEN
            RAISE NOTICE 'subscription % would not receive % events (event_types or filter); the sample is sent anyway', p_id, p_type;
        END IF;
    END IF;
    -- A test event is delivered to this subscription only: transaction id 0, which is in no
    -- batch the fan-out takes (and which replay skips). Entity 'webhook': made by pg_webhooks,
    -- not by a change of a tracked row.
    INSERT INTO webhooks._events (type, entity, key, data, xid)
    VALUES (p_type, 'webhook', NULL, v_data, '0'::xid8)
    RETURNING seq, created_at INTO v_seq, v_at;
    -- Fan-out never sees it, so it is counted as emitted here (writer -1: SQL functions).
    INSERT INTO webhooks._event_stats AS t (bucket, event_type, worker, emitted)
    VALUES (date_trunc('hour', v_at, 'UTC'), left(p_type, 200), -1, 1)
    ON CONFLICT ON CONSTRAINT _event_stats_pkey DO UPDATE SET emitted = t.emitted + 1;
    RETURN webhooks._enqueue_unordered(v_seq, p_id, NULL);
END
$$;

CREATE FUNCTION webhooks.redeliver(delivery bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_old webhooks._deliveries;
BEGIN
    SELECT * INTO v_old FROM webhooks._deliveries d WHERE d.id = delivery;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'delivery % does not exist', coalesce(delivery::text, 'NULL') USING ERRCODE = 'no_data_found';
    END IF;
    PERFORM webhooks._subscription_exists(v_old.subscription_id);
    -- Retention skips (SKIP LOCKED) an event a transaction is about to refer to.
    PERFORM 1 FROM webhooks._events e WHERE e.seq = v_old.event_seq FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the event of delivery % is no longer retained', delivery USING ERRCODE = 'no_data_found';
    END IF;
    RETURN webhooks._enqueue_unordered(v_old.event_seq, v_old.subscription_id, v_old.id);
END
$$;

CREATE FUNCTION webhooks.replay(
    id bigint,
    since timestamptz,
    until timestamptz DEFAULT now(),
    event_types text[] DEFAULT NULL
) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p_id    bigint := id;
    v_sub   webhooks._subscriptions;
    v_count integer;
    -- Ordering keys of their own, unique to this call (two replays in one transaction too).
    v_batch text := 'replay:' || pg_catalog.gen_random_uuid() || ':';
BEGIN
    PERFORM webhooks._subscription_exists(p_id);
    IF since IS NULL OR until IS NULL OR since > until THEN
        RAISE EXCEPTION 'replay needs since <= until' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v_sub FROM webhooks._subscriptions s WHERE s.id = p_id;
    IF event_types IS NOT NULL THEN
        -- Patterns may name the subscription's renamed types, as its own event_types may.
        PERFORM webhooks._check_shape(v_sub.shape::text, event_types, NULL);
    END IF;
    -- Replayed deliveries keep commit order per key among themselves, but do not wait
    -- behind the live queue (their ordering key is their own).
    WITH ev AS (
        -- Locked so that retention (SKIP LOCKED) leaves them until these deliveries commit.
        SELECT e.seq, e.entity, e.key FROM webhooks._events e
         WHERE e.created_at >= since AND e.created_at < until
           AND e.type <> 'webhook.test'
           AND e.xid <> '0'::xid8  -- send_test's events (samples too) were for one subscription only
           -- Not this transaction's own emits: they get their final seq at commit.
           AND e.xid IS DISTINCT FROM pg_catalog.pg_current_xact_id_if_assigned()
           AND webhooks._matches(v_sub.event_types, v_sub.filter, e.type, e.data, v_sub.shape -> 'event_names')
           AND (event_types IS NULL OR webhooks._matches(event_types, NULL, e.type, e.data, v_sub.shape -> 'event_names'))
           FOR KEY SHARE OF e
    ), d AS (
        INSERT INTO webhooks._deliveries (event_seq, subscription_id, next_attempt_at)
        SELECT ev.seq, p_id, now() FROM ev ORDER BY ev.seq
        RETURNING _deliveries.id, _deliveries.event_seq
    )
    INSERT INTO webhooks._queue (delivery_id, subscription_id, event_seq, ordering_key, head)
    SELECT d.id, p_id, d.event_seq, CASE WHEN ev.key IS NOT NULL THEN v_batch || ev.entity || ':' || ev.key END,
           ev.key IS NULL OR row_number() OVER (PARTITION BY ev.entity, ev.key ORDER BY d.event_seq) = 1
      FROM d JOIN ev ON ev.seq = d.event_seq;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count > 0 THEN
        PERFORM webhooks._wake_worker_at_commit();
    END IF;
    RETURN v_count;
END
$$;

------------------------------------------------------------------------------------------
-- Pull instead of push. API: Public (webhooks.poll is in src/poll.rs)
------------------------------------------------------------------------------------------
-- The work of webhooks.poll(), run as the extension's owner once poll() has checked that the
-- caller may poll the subscription: executable by nobody else. A subscription's pollers take
-- its row lock in turn (one at a time, each seeing what the one before acknowledged), and its
-- deliveries come in the order of their ids, the order fan-out created them in: commit order,
-- per ordering key as pushes keep it (redeliveries, replays and samples are unordered, as for
-- pushes, and come where their ids put them). `p_after` first acknowledges the deliveries up to
-- that cursor that an earlier call handed out (claimed_by -1): they end succeeded, with an
-- attempt row saying so. A delivery queued by a transaction that committed after a higher
-- cursor was handed out is not acknowledged by that cursor: it was never handed out, and
-- comes in the next call. Then the next p_limit deliveries, acknowledged or not yet, are
-- handed out again from the start: a consumer that restarts with its last cursor gets
-- everything after it again, and nothing before it twice.
CREATE FUNCTION webhooks._poll(p_subscription bigint, p_after bigint, p_limit integer)
RETURNS TABLE (cursor bigint, event_id uuid, event_type text, created_at timestamptz, created_at_text text, data text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sub webhooks._subscriptions;
BEGIN
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 10000 THEN
        RAISE EXCEPTION 'limit must be between 1 and 10000' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- One poller of a subscription at a time (NO KEY: the FK from _secrets need not wait).
    SELECT * INTO v_sub FROM webhooks._subscriptions s WHERE s.id = p_subscription FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'subscription % does not exist', coalesce(p_subscription::text, 'NULL') USING ERRCODE = 'no_data_found';
    END IF;
    IF v_sub.delivery <> 'poll' THEN
        RAISE EXCEPTION 'subscription % is delivered by push, not polled', p_subscription
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Create a subscription with url => NULL, delivery => ''poll'' for a consumer that polls.';
    END IF;
    IF p_after IS NOT NULL THEN
        WITH q AS (
            DELETE FROM webhooks._queue q
             WHERE q.subscription_id = p_subscription AND q.delivery_id <= p_after AND q.claimed_by = -1
            RETURNING q.delivery_id, q.attempts, q.claimed_at
        ), d AS (
            UPDATE webhooks._deliveries d
               SET status = 'succeeded', attempts = q.attempts, delivered_at = now(), next_attempt_at = NULL,
                   last_status_code = NULL, last_error = NULL
              FROM q WHERE d.id = q.delivery_id AND d.status NOT IN ('succeeded', 'dead')
            RETURNING d.id, d.event_seq, q.attempts, q.claimed_at
        ), a AS (
            INSERT INTO webhooks._attempts (delivery_id, attempt, started_at, duration_ms, status_code, response_body, error)
            SELECT d.id, d.attempts, d.claimed_at, EXTRACT(epoch FROM now() - d.claimed_at) * 1000, NULL,
                   'acknowledged through webhooks.poll()', NULL
              FROM d
        ), ds AS (
            -- subscription_health counts them as delivered (writer -1: SQL functions; the
            -- subscription's pollers are serialized, so the row is nobody else's).
            INSERT INTO webhooks._delivery_stats AS t (width, bucket, subscription_id, worker, attempts, succeeded)
            SELECT w.width, date_trunc(w.unit, now(), 'UTC'), p_subscription, -1, n.n, n.n
              FROM (SELECT count(*) AS n FROM d) n
             CROSS JOIN (VALUES (interval '1 minute', 'minute'), (interval '1 hour', 'hour')) AS w(width, unit)
             WHERE n.n > 0
            ON CONFLICT (width, bucket, subscription_id, worker) DO UPDATE
               SET attempts = t.attempts + excluded.attempts, succeeded = t.succeeded + excluded.succeeded
        )
        INSERT INTO webhooks._event_stats AS t (bucket, event_type, worker, delivered)
        SELECT date_trunc('hour', now(), 'UTC'), left(e.type, 200), -1, count(*)
          FROM d JOIN webhooks._events e ON e.seq = d.event_seq
         GROUP BY 2 ORDER BY 2
        ON CONFLICT ON CONSTRAINT _event_stats_pkey DO UPDATE SET delivered = t.delivered + excluded.delivered;
    END IF;
    IF v_sub.state <> 'active' THEN
        -- Held, as a paused push subscription's deliveries are, until it is resumed.
        RAISE NOTICE 'subscription % is %: its deliveries are held until webhooks.resume(%)', p_subscription, v_sub.state, p_subscription;
        RETURN;
    END IF;
    RETURN QUERY
    WITH pick AS (
        SELECT q.delivery_id FROM webhooks._queue q
         WHERE q.subscription_id = p_subscription
         ORDER BY q.subscription_id, q.delivery_id
         LIMIT p_limit
    ), handed AS (
        UPDATE webhooks._queue q SET claimed_at = now(), claimed_by = -1, attempts = q.attempts + 1
          FROM pick WHERE q.delivery_id = pick.delivery_id
        RETURNING q.delivery_id, q.event_seq
    )
    SELECT h.delivery_id, e.id, e.type, e.created_at,
           to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), e.data::text
      FROM handed h JOIN webhooks._events e ON e.seq = h.event_seq
     ORDER BY h.delivery_id;
END
$$;

-- Let `role` (and its members) poll subscription `id`; webhooks_admin may poll them all. The
-- role also needs webhooks_consumer (USAGE on the schema, EXECUTE on poll). API: Public
CREATE FUNCTION webhooks.grant_poll(id bigint, role regrole) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p_id bigint := id;
BEGIN
    PERFORM webhooks._subscription_exists(p_id);
    IF role IS NULL THEN
        RAISE EXCEPTION 'role must not be NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (SELECT s.delivery FROM webhooks._subscriptions s WHERE s.id = p_id) <> 'poll' THEN
        RAISE EXCEPTION 'subscription % is delivered by push, not polled', p_id USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO webhooks._poll_grants (subscription_id, role) VALUES (p_id, role) ON CONFLICT DO NOTHING;
    IF NOT pg_has_role(role::oid, 'webhooks_consumer', 'USAGE') THEN
        RAISE NOTICE 'role % is not a member of webhooks_consumer: it cannot call webhooks.poll() yet', role
            USING HINT = format('GRANT webhooks_consumer TO %s;', role);
    END IF;
END
$$;

CREATE FUNCTION webhooks.revoke_poll(id bigint, role regrole) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p_id bigint := id;
BEGIN
    PERFORM webhooks._subscription_exists(p_id);
    DELETE FROM webhooks._poll_grants g WHERE g.subscription_id = p_id AND g.role = revoke_poll.role;
END
$$;

------------------------------------------------------------------------------------------
-- Operating it: rollups read back, the request of a delivery.
------------------------------------------------------------------------------------------
-- Response-time histograms of many rollup rows added up (src/stats.rs). API: Private
CREATE AGGREGATE webhooks._hist_sum(bigint[]) (SFUNC = webhooks._hist_add, STYPE = bigint[]);

-- The request of a delivery, masked (src/request.rs). It reads _secrets (header names, how
-- many secrets sign) with the owner's rights; the caller needs only EXECUTE on it, which
-- webhooks_reader has. API: Public
CREATE FUNCTION webhooks.request(delivery_id bigint)
RETURNS TABLE (method text, url text, headers jsonb, body text)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT r.method, r.url, r.headers, r.body FROM webhooks._request(delivery_id) AS r $$;

------------------------------------------------------------------------------------------
-- Read views. API: Public
------------------------------------------------------------------------------------------
CREATE VIEW webhooks.subscriptions AS
SELECT s.id,
       webhooks._mask_url(s.url) AS url,
       s.event_types,
       s.state = 'active' AS active,
       s.state,
       s.disabled_reason,
       s.description,
       s.filter,
       s.signature,
       s.signature_header,
       s.timeout,
       s.retry_schedule,
       ARRAY(SELECT jsonb_object_keys(k.headers) ORDER BY 1) AS header_names,
       k.previous_expires_at AS previous_secret_expires_at,
       s.failing_since,
       s.created_at,
       s.updated_at,
       s.shape,
       s.delivery,
       ARRAY(SELECT g.role FROM webhooks._poll_grants g WHERE g.subscription_id = s.id ORDER BY g.role::text) AS poll_roles,
       s.signature_options,
       s.tls
  FROM webhooks._subscriptions s
  LEFT JOIN webhooks._secrets k ON k.subscription_id = s.id;

CREATE VIEW webhooks.events AS
SELECT e.id, e.type, e.key, e.data, e.created_at, e.entity, e.seq
  FROM webhooks._events e;

CREATE VIEW webhooks.deliveries AS
SELECT d.id, e.id AS event_id, d.subscription_id, d.status, d.attempts, d.next_attempt_at,
       d.last_status_code, d.last_error, d.created_at, d.delivered_at, d.redelivery_of,
       e.type AS event_type, e.key AS event_key
  FROM webhooks._deliveries d
  JOIN webhooks._events e ON e.seq = d.event_seq;

CREATE VIEW webhooks.attempts AS
SELECT a.delivery_id, a.attempt, a.started_at, a.duration_ms, a.status_code, a.response_body, a.error
  FROM webhooks._attempts a;

-- A subscription's queued deliveries, counted in _queue_subscription_idx. A function, so that
-- the view's plan does not carry the count's cost: with a large backlog that cost would make
-- every poll of the view JIT-compiled (700 ms of a 1 s poll with a 1M backlog, bench/health.sh).
-- It reads the queue with its owner's rights, for webhooks_reader. API: Private
CREATE FUNCTION webhooks._backlog(p_subscription bigint) RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$ SELECT count(*) FROM webhooks._queue q WHERE q.subscription_id = p_subscription $$;

-- Per subscription, from the rollups the worker keeps (never from _attempts, whatever its
-- size): the last hour is the minute rows starting after now() - 1 hour (the current minute
-- and the 59 before it), the last day the hour rows starting after now() - 1 day (the current
-- hour and the 23 before it), each a range of _delivery_stats' key. The backlog is counted in
-- _queue_subscription_idx (_backlog, an index-only scan: its cost grows with the backlog), the
-- oldest queued delivery is a probe of it. Polling reads about 84 rollup rows per subscription and
-- worker.
CREATE VIEW webhooks.subscription_health AS
SELECT s.id AS subscription_id,
       webhooks._mask_url(s.url) AS url,
       s.state,
       s.disabled_reason,
       s.failing_since,
       COALESCE(h.attempts, 0) AS attempts_1h,
       COALESCE(h.succeeded, 0) AS delivered_1h,
       COALESCE(h.failed, 0) AS failed_1h,
       COALESCE(h.dead, 0) AS dead_1h,
       round(h.succeeded::numeric / NULLIF(h.attempts, 0), 4) AS success_rate_1h,
       webhooks._hist_quantile(h.hist, 0.50) AS p50_ms_1h,
       webhooks._hist_quantile(h.hist, 0.95) AS p95_ms_1h,
       webhooks._hist_quantile(h.hist, 0.99) AS p99_ms_1h,
       COALESCE(d.attempts, 0) AS attempts_24h,
       COALESCE(d.succeeded, 0) AS delivered_24h,
       COALESCE(d.failed, 0) AS failed_24h,
       COALESCE(d.dead, 0) AS dead_24h,
       round(d.succeeded::numeric / NULLIF(d.attempts, 0), 4) AS success_rate_24h,
       webhooks._hist_quantile(d.hist, 0.50) AS p50_ms_24h,
       webhooks._hist_quantile(d.hist, 0.95) AS p95_ms_24h,
       webhooks._hist_quantile(d.hist, 0.99) AS p99_ms_24h,
       webhooks._backlog(s.id) AS backlog,
       o.created_at AS oldest_queued_at,
       now() - o.created_at AS oldest_queued_age,
       s.consecutive_failures,
       s.last_error,
       s.last_error_at,
       s.last_status_code
  FROM webhooks._subscriptions s
  LEFT JOIN (SELECT t.subscription_id, sum(t.attempts)::bigint AS attempts, sum(t.succeeded)::bigint AS succeeded,
                    sum(t.failed)::bigint AS failed, sum(t.dead)::bigint AS dead,
                    webhooks._hist_sum(t.latency_hist) AS hist
               FROM webhooks._delivery_stats t
              WHERE t.width = '1 minute' AND t.bucket > now() - interval '1 hour'
              GROUP BY t.subscription_id) h ON h.subscription_id = s.id
  LEFT JOIN (SELECT t.subscription_id, sum(t.attempts)::bigint AS attempts, sum(t.succeeded)::bigint AS succeeded,
                    sum(t.failed)::bigint AS failed, sum(t.dead)::bigint AS dead,
                    webhooks._hist_sum(t.latency_hist) AS hist
               FROM webhooks._delivery_stats t
              WHERE t.width = '1 hour' AND t.bucket > now() - interval '1 day'
              GROUP BY t.subscription_id) d ON d.subscription_id = s.id
  -- The oldest queued delivery of each subscription is its lowest id (ids are taken in
  -- creation order): the first entry of each subscription in _queue_subscription_idx, one
  -- probe per subscription with a queue (as END_ORPHANS walks it). Ordered by both columns
  -- with a range on the first, so that only this index can answer it: a min(delivery_id)
  -- per subscription may be planned as a walk of the primary key in id order filtered by
  -- subscription, which reads the whole queue for a subscription that has nothing queued.
  LEFT JOIN (
        WITH RECURSIVE o(sub, id) AS (
            (SELECT q.subscription_id, q.delivery_id FROM webhooks._queue q
              ORDER BY q.subscription_id, q.delivery_id LIMIT 1)
          UNION ALL
            SELECT n.subscription_id, n.delivery_id
              FROM o CROSS JOIN LATERAL (
                   SELECT q.subscription_id, q.delivery_id FROM webhooks._queue q
                    WHERE q.subscription_id > o.sub
                    ORDER BY q.subscription_id, q.delivery_id LIMIT 1) n
        )
        SELECT o.sub, (SELECT d.created_at FROM webhooks._deliveries d WHERE d.id = o.id) AS created_at
          FROM o
       ) o ON o.sub = s.id;

-- Per event type and hour (UTC), from _event_stats: a filter on hour is a range of its key.
CREATE VIEW webhooks.event_stats AS
SELECT t.event_type,
       t.bucket AS hour,
       sum(t.emitted)::bigint AS emitted,
       sum(t.delivered)::bigint AS delivered,
       sum(t.retried)::bigint AS retried,
       sum(t.dead)::bigint AS dead
  FROM webhooks._event_stats t
 GROUP BY t.bucket, t.event_type;

------------------------------------------------------------------------------------------
-- Comments
------------------------------------------------------------------------------------------
COMMENT ON FUNCTION webhooks.track(regclass, text, name, name, jsonb) IS
    'Capture INSERT/UPDATE/DELETE on a table as <entity>.created/updated/status_updated/<status>/deleted events, net per transaction, payload read at commit.';
COMMENT ON FUNCTION webhooks.untrack(regclass) IS 'Stop capturing a table (removes its triggers).';
COMMENT ON FUNCTION webhooks.emit(text, jsonb, text) IS 'Enqueue any other event; delivered after commit. Returns the event id.';
COMMENT ON FUNCTION webhooks.subscribe(text, text[], text, jsonb, jsonb, text, text, interval, text, text, jsonb, jsonb, jsonb, text) IS
    'Create a subscription; returns its id and its signing secret (shown only this once).';
COMMENT ON FUNCTION webhooks.set_shape(bigint, jsonb) IS
    'Set (NULL: remove) a subscription''s request shape: event names, body template, event type and delivery id headers, JSON spelling. Applies to attempts made from now on.';
COMMENT ON FUNCTION webhooks.pause(bigint) IS 'Hold deliveries of a subscription; events keep queueing.';
COMMENT ON FUNCTION webhooks.resume(bigint) IS 'Resume a paused or disabled subscription; its held backlog flows again.';
COMMENT ON FUNCTION webhooks.unsubscribe(bigint) IS 'Delete a subscription; queued deliveries end as dead, history stays.';
COMMENT ON FUNCTION webhooks.rotate_secret(bigint, interval, text) IS
    'New signing secret (generated, or the one given; returned once); the old one still signs during the grace period.';
COMMENT ON FUNCTION webhooks.set_signature(bigint, text, text, jsonb) IS
    'Change how a subscription''s deliveries are signed (style, header, options); the secrets stay.';
COMMENT ON FUNCTION webhooks.set_tls(bigint, jsonb) IS
    'Set (or, with NULL, remove) a subscription''s client certificate and key and CA bundle.';
COMMENT ON FUNCTION webhooks.send_test(bigint, text) IS
    'Queue a test delivery to this subscription only: webhook.test, or a realistic sample of a tracked table''s event type (synthesized values, no real rows); returns the delivery id.';
COMMENT ON FUNCTION webhooks.poll(bigint, bigint, integer) IS
    'Acknowledge the deliveries of a poll subscription up to cursor `after`, then return the next ones in commit order (cursor, event id, type, created_at, body as a push would send it).';
COMMENT ON FUNCTION webhooks.grant_poll(bigint, regrole) IS 'Let a role (a member of webhooks_consumer) poll this subscription.';
COMMENT ON FUNCTION webhooks.revoke_poll(bigint, regrole) IS 'Take back webhooks.grant_poll().';
COMMENT ON COLUMN webhooks.subscriptions.delivery IS 'push (the worker POSTs to url) | poll (a consumer calls webhooks.poll())';
COMMENT ON COLUMN webhooks.subscriptions.poll_roles IS 'Roles granted webhooks.poll() on it besides webhooks_admin (webhooks.grant_poll).';
COMMENT ON FUNCTION webhooks.redeliver(bigint) IS 'Queue a new delivery of the same event (same webhook-id); returns its id.';
COMMENT ON FUNCTION webhooks.replay(bigint, timestamptz, timestamptz, text[]) IS
    'Queue new deliveries, in commit order, of the events in [since, until) that match the subscription now.';
-- Capture keeps a copy of status_events in each backend; a change to it drops every copy.
CREATE TRIGGER status_events_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON webhooks.status_events
    FOR EACH STATEMENT EXECUTE FUNCTION webhooks._status_events_changed();
COMMENT ON TABLE webhooks.status_events IS 'Status value -> lifecycle event type, per entity. Edit freely.';
COMMENT ON VIEW webhooks.subscriptions IS 'Subscriptions, without secrets or header values; URL credentials masked.';
COMMENT ON VIEW webhooks.events IS 'Every event, in commit order (seq).';
COMMENT ON VIEW webhooks.deliveries IS 'One row per event x subscription delivery and its current state.';
COMMENT ON VIEW webhooks.attempts IS 'One row per HTTP attempt of a delivery.';
COMMENT ON COLUMN webhooks.deliveries.status IS 'pending | retrying | succeeded | dead';
COMMENT ON COLUMN webhooks.deliveries.event_id IS 'The event id, sent as webhook-id on every attempt.';
COMMENT ON COLUMN webhooks.deliveries.redelivery_of IS 'The delivery this one redelivers, if any.';
COMMENT ON COLUMN webhooks.attempts.duration_ms IS 'From the start of DNS resolution to the end of the capped response body.';
COMMENT ON COLUMN webhooks.attempts.response_body IS 'The first webhooks.max_response_bytes bytes of the response.';
COMMENT ON COLUMN webhooks.subscriptions.active IS 'False while paused or disabled (deliveries are held, not dropped).';
COMMENT ON COLUMN webhooks.subscriptions.shape IS 'The request shape (event names, body template, headers, JSON spelling); NULL: the Standard Webhooks envelope.';
COMMENT ON COLUMN webhooks.subscriptions.signature_options IS 'The hmac style''s settings: header, encoding, prefix, signed, timestamp_header, timestamp_format.';
COMMENT ON COLUMN webhooks.subscriptions.tls IS 'What may be shown of the TLS settings: the client certificate''s subject, issuer and expiry (not_after), the CA bundle''s size; never the key.';
COMMENT ON FUNCTION webhooks.worker_status() IS
    'One row per delivery worker of every database in webhooks.database, read from shared memory (no table is read): state, pid, last wake, requests in flight, queue depth, counters since the worker started. What a monitoring system should scrape.';
COMMENT ON FUNCTION webhooks.request(bigint) IS
    'The HTTP request that was (or will be) sent for a delivery: body byte for byte, headers with signatures and custom header values masked.';
COMMENT ON VIEW webhooks.subscription_health IS
    'Per subscription: state, attempts, success rate and response times over the last hour and day (from rollups the worker keeps), backlog, failure streak.';
COMMENT ON COLUMN webhooks.subscription_health.url IS 'The endpoint, credentials masked.';
COMMENT ON COLUMN webhooks.subscription_health.state IS 'active | paused | disabled';
COMMENT ON COLUMN webhooks.subscription_health.disabled_reason IS 'Why it was disabled (410 Gone, failing continuously), if it was.';
COMMENT ON COLUMN webhooks.subscription_health.failing_since IS 'Start of the current run of failures (for webhooks.disable_after), NULL while healthy.';
COMMENT ON COLUMN webhooks.subscription_health.attempts_1h IS 'Attempts started in the current minute and the 59 before it.';
COMMENT ON COLUMN webhooks.subscription_health.delivered_1h IS 'Of those, the ones that succeeded (2xx): deliveries done.';
COMMENT ON COLUMN webhooks.subscription_health.failed_1h IS 'Of those, the ones that failed (retried or dead).';
COMMENT ON COLUMN webhooks.subscription_health.dead_1h IS 'Failed attempts that were their delivery''s last (it ended dead).';
COMMENT ON COLUMN webhooks.subscription_health.success_rate_1h IS 'delivered_1h / attempts_1h, NULL without attempts.';
COMMENT ON COLUMN webhooks.subscription_health.p50_ms_1h IS 'Median response time (ms) of the last hour''s attempts, within about 9% (histogram).';
COMMENT ON COLUMN webhooks.subscription_health.p95_ms_1h IS '95th percentile response time (ms), last hour, within about 9%.';
COMMENT ON COLUMN webhooks.subscription_health.p99_ms_1h IS '99th percentile response time (ms), last hour, within about 9%.';
COMMENT ON COLUMN webhooks.subscription_health.attempts_24h IS 'Attempts started in the current hour and the 23 before it.';
COMMENT ON COLUMN webhooks.subscription_health.delivered_24h IS 'Of those, the ones that succeeded (2xx).';
COMMENT ON COLUMN webhooks.subscription_health.failed_24h IS 'Of those, the ones that failed (retried or dead).';
COMMENT ON COLUMN webhooks.subscription_health.dead_24h IS 'Failed attempts that were their delivery''s last (it ended dead).';
COMMENT ON COLUMN webhooks.subscription_health.success_rate_24h IS 'delivered_24h / attempts_24h, NULL without attempts.';
COMMENT ON COLUMN webhooks.subscription_health.p50_ms_24h IS 'Median response time (ms), last day, within about 9%.';
COMMENT ON COLUMN webhooks.subscription_health.p95_ms_24h IS '95th percentile response time (ms), last day, within about 9%.';
COMMENT ON COLUMN webhooks.subscription_health.p99_ms_24h IS '99th percentile response time (ms), last day, within about 9%.';
COMMENT ON COLUMN webhooks.subscription_health.backlog IS 'Deliveries queued (due, waiting for a retry, held or in flight).';
COMMENT ON COLUMN webhooks.subscription_health.oldest_queued_at IS 'When its oldest queued delivery was created.';
COMMENT ON COLUMN webhooks.subscription_health.oldest_queued_age IS 'now() - oldest_queued_at.';
COMMENT ON COLUMN webhooks.subscription_health.consecutive_failures IS 'Failed attempts since the last successful one.';
COMMENT ON COLUMN webhooks.subscription_health.last_error IS 'Error of the last failed attempt (e.g. HTTP 500, timeout), URL credentials masked.';
COMMENT ON COLUMN webhooks.subscription_health.last_error_at IS 'When the last failed attempt started.';
COMMENT ON COLUMN webhooks.subscription_health.last_status_code IS 'HTTP status of the last failed attempt, NULL if it got no response.';
COMMENT ON VIEW webhooks.event_stats IS 'Per event type and hour (UTC): events emitted, deliveries delivered, attempts retried, deliveries dead.';
COMMENT ON COLUMN webhooks.event_stats.event_type IS 'The event type, e.g. order.paid.';
COMMENT ON COLUMN webhooks.event_stats.hour IS 'Start of the hour (UTC) the events were created, or the outcomes attempted, in.';
COMMENT ON COLUMN webhooks.event_stats.emitted IS 'Events of the type created in the hour and fanned out (while some subscription existed).';
COMMENT ON COLUMN webhooks.event_stats.delivered IS 'Deliveries of the type that succeeded in the hour.';
COMMENT ON COLUMN webhooks.event_stats.retried IS 'Failed attempts in the hour after which the delivery was retried.';
COMMENT ON COLUMN webhooks.event_stats.dead IS 'Deliveries that ended dead in the hour (their last attempt failed).';

------------------------------------------------------------------------------------------
-- Privileges. Secrets (_secrets) are readable by superusers only.
------------------------------------------------------------------------------------------
REVOKE ALL ON ALL TABLES IN SCHEMA webhooks FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA webhooks FROM PUBLIC;
-- Capture triggers run as the writing application's role.
GRANT EXECUTE ON FUNCTION webhooks._capture_row(), webhooks._capture_child(), webhooks._refuse_truncate() TO PUBLIC;

GRANT USAGE ON SCHEMA webhooks TO webhooks_reader, webhooks_admin;
GRANT SELECT ON webhooks.subscriptions, webhooks.events, webhooks.deliveries, webhooks.attempts,
                webhooks.status_events, webhooks.subscription_health, webhooks.event_stats TO webhooks_reader;
-- A view's functions are called with the reader's own rights.
GRANT EXECUTE ON FUNCTION webhooks.request(bigint), webhooks._hist_sum(bigint[]),
                          webhooks._hist_quantile(bigint[], double precision), webhooks._backlog(bigint)
    TO webhooks_reader;
GRANT INSERT, UPDATE, DELETE ON webhooks.status_events TO webhooks_admin;
GRANT SELECT ON webhooks._tracked TO webhooks_admin;
-- _tracked is written only through track/untrack (their Rust halves check the caller's rights).
GRANT EXECUTE ON FUNCTION webhooks._register_tracked(oid, text, smallint, smallint, jsonb),
                          webhooks._unregister_tracked(oid) TO webhooks_admin;
-- The capture role: read the configuration, write events.
GRANT USAGE ON SCHEMA webhooks TO webhooks_capture;
GRANT SELECT ON webhooks._tracked, webhooks.status_events TO webhooks_capture;
GRANT INSERT ON webhooks._events TO webhooks_capture;
GRANT SELECT (seq, id) ON webhooks._events TO webhooks_capture;  -- INSERT ... RETURNING
GRANT UPDATE (seq) ON webhooks._events TO webhooks_capture;       -- emit's seq, at commit
GRANT USAGE ON SEQUENCE webhooks._events_seq_seq TO webhooks_capture;
GRANT EXECUTE ON FUNCTION
    webhooks.track(regclass, text, name, name, jsonb), webhooks.untrack(regclass),
    webhooks._track(regclass, text, name, name, jsonb, text), webhooks._lock_tracking(),
    webhooks._lock_tables_for_tracking(oid[]), webhooks._lock_for_untracking(oid),
    webhooks.emit(text, jsonb, text),
    webhooks.subscribe(text, text[], text, jsonb, jsonb, text, text, interval, text, text, jsonb, jsonb, jsonb, text),
    webhooks.set_shape(bigint, jsonb),
    webhooks.pause(bigint), webhooks.resume(bigint), webhooks.unsubscribe(bigint),
    webhooks.rotate_secret(bigint, interval, text), webhooks.send_test(bigint, text),
    webhooks.set_signature(bigint, text, text, jsonb), webhooks.set_tls(bigint, jsonb),
    webhooks.grant_poll(bigint, regrole), webhooks.revoke_poll(bigint, regrole),
    webhooks.redeliver(bigint), webhooks.replay(bigint, timestamptz, timestamptz, text[]),
    webhooks._singular(text), webhooks._mask_url(text), webhooks._matches(text[], jsonb, text, jsonb),
    webhooks._matches(text[], jsonb, text, jsonb, jsonb)
    TO webhooks_admin;
GRANT EXECUTE ON FUNCTION webhooks._mask_url(text) TO webhooks_reader;
GRANT EXECUTE ON FUNCTION webhooks.worker_status() TO webhooks_reader;
-- Polling: the consumers' role (webhooks_admin is a member); poll() itself checks that the
-- caller may poll the subscription it names.
GRANT USAGE ON SCHEMA webhooks TO webhooks_consumer;
GRANT EXECUTE ON FUNCTION webhooks.poll(bigint, bigint, integer) TO webhooks_consumer;

-- pg_dump keeps user data of the configuration tables.
SELECT pg_catalog.pg_extension_config_dump('webhooks._tracked', '');
SELECT pg_catalog.pg_extension_config_dump('webhooks.status_events', '');
SELECT pg_catalog.pg_extension_config_dump('webhooks._subscriptions', '');
SELECT pg_catalog.pg_extension_config_dump('webhooks._subscriptions_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('webhooks._secrets', '');
SELECT pg_catalog.pg_extension_config_dump('webhooks._poll_grants', '');
