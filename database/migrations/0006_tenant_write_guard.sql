-- Nothing is writable for a tenant being removed: once its status is
-- 'deprovisioning', an INSERT into any table that references tenants(id), or
-- an UPDATE of such a row, fails with SQLSTATE CRM01 and a message naming the
-- tenant (the services map it to FAILED_PRECONDITION, TENANT_DEPROVISIONING).
-- DELETE stays allowed: deprovisioning deletes.
--
-- One statement-level trigger per table and event. Its fast path is one read
-- of a flag, the sequence tenant_write_guard_flag: 0 while no tenant is being
-- deprovisioned, which is nearly always. A sequence because its value is not
-- transactional (every session sees a change at once) and reading it is a
-- function call, not a query. Only while the flag is up does the guard read
-- the statement's rows (its transition table) and their tenants' status.
--
-- The flag goes up (tenant_write_guard_raise, from a trigger on tenants) in
-- the transaction that marks a tenant 'deprovisioning', before that commits,
-- and again whenever deprovision_claim claims a job. It comes down only
-- through tenant_write_guard_lower(), called after a deprovisioning completes,
-- and only if no tenant is left in that status. Both hold one transaction-
-- level advisory lock, so a lowering waits for a marking in flight and then
-- sees it. A flag left up (a marking rolled back, a lowering that never ran)
-- costs speed, never safety.
--
-- Writers racing the mark: a new row of a tenant (an INSERT, or an UPDATE
-- that sets tenant_id) has its foreign key checked, which holds the tenant
-- row FOR KEY SHARE until its transaction ends, and the guard runs after
-- those checks (statement-level AFTER triggers fire after row-level ones; the
-- assert below refuses deferrable foreign keys, which would fire at commit).
-- deprovision_claim takes the tenant row FOR UPDATE before marking it. So a
-- writer that read the flag down held its lock before the claim's, and the
-- claim waited for it: its rows are deleted with the rest. A write that comes
-- later waits for the claim, and finds the flag up and the mark: under READ
-- COMMITTED the check reads the new status; under REPEATABLE READ or
-- SERIALIZABLE, whose snapshot is older, it locks the tenant row FOR SHARE,
-- which fails with a serialization error (40001, retryable) rather than read
-- a stale status. An UPDATE that keeps its row's tenant_id takes no such
-- lock, but that row existed before the mark: the batches wait for its lock
-- and delete it. (A marking by a plain UPDATE, not through the claim, does
-- not wait for the writers in flight; the final sweep and the foreign keys
-- then catch their rows.)
--
-- Tables added later get the guard from tenant_write_guard_attach(table,
-- column); deprovisioning refuses to start while a table that references
-- tenants(id) lacks it (tenant_write_guard_assert, called by
-- deprovision_assert_tables).

CREATE SEQUENCE tenant_write_guard_flag AS smallint MINVALUE 0 MAXVALUE 1;
-- Only its owner may set it (Supabase's default privileges would give the API
-- roles everything); anyone may read it, so that every writer's fast path works.
REVOKE ALL ON SEQUENCE tenant_write_guard_flag FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT ON SEQUENCE tenant_write_guard_flag TO PUBLIC;

-- The tenants being deprovisioned: none, nearly always.
CREATE INDEX tenants_deprovisioning_idx ON tenants (id) WHERE status = 'deprovisioning';

-- The one lock that orders raising and lowering the flag.
CREATE FUNCTION tenant_write_guard_flag_lock() RETURNS void
LANGUAGE sql
SET search_path = public, pg_temp
AS $$ SELECT pg_advisory_xact_lock(hashtextextended('tenant_write_guard_flag', 0)) $$;

-- Raise the flag, holding the lock until this transaction ends: a lowering
-- then waits for it, and sees what it marked.
CREATE FUNCTION tenant_write_guard_raise() RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM tenant_write_guard_flag_lock();
    PERFORM setval('tenant_write_guard_flag', 1);
END
$$;

CREATE FUNCTION tenant_write_guard_raise_on_mark() RETURNS trigger
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM tenant_write_guard_raise();
    RETURN NULL;
END
$$;

-- Any marking raises the flag, deprovision_claim's or an operator's UPDATE.
-- ALWAYS: also when changes are replayed (session_replication_role = replica).
CREATE TRIGGER tenant_write_guard_raise
AFTER INSERT OR UPDATE ON tenants
FOR EACH ROW WHEN (NEW.status = 'deprovisioning')
EXECUTE FUNCTION tenant_write_guard_raise_on_mark();
ALTER TABLE tenants ENABLE ALWAYS TRIGGER tenant_write_guard_raise;

-- Lower the flag if no tenant is being deprovisioned; true if it is down.
-- Only under READ COMMITTED: its check must see every marking committed
-- before it took the lock, which an older snapshot would not.
CREATE FUNCTION tenant_write_guard_lower() RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'the write guard''s flag can only be lowered under READ COMMITTED'
            USING ERRCODE = 'invalid_transaction_state', HINT = 'WRONG_ISOLATION';
    END IF;
    PERFORM tenant_write_guard_flag_lock();
    IF EXISTS (SELECT 1 FROM tenants WHERE status = 'deprovisioning') THEN
        RETURN false;
    END IF;
    PERFORM setval('tenant_write_guard_flag', 0);
    RETURN true;
END
$$;

DO $$
BEGIN
    PERFORM setval('tenant_write_guard_flag',
                   CASE WHEN EXISTS (SELECT 1 FROM tenants WHERE status = 'deprovisioning')
                        THEN 1 ELSE 0 END);
END
$$;

-- The guard itself: the flag, then (only while it is up) the statement's
-- tenants, checked by tenant_write_guard_check.
CREATE FUNCTION tenant_write_guard() RETURNS trigger
LANGUAGE plpgsql
-- No SET search_path here, unlike our other functions: switching it on every
-- call cost a write about as much as the rest of the guard (bench guard).
-- So every name is schema-qualified, operators included: a writer's own
-- search_path cannot change what this runs.
AS $$
DECLARE
    v_tenants text[];
BEGIN
    -- Down (0) while no tenant is being deprovisioned; unset (NULL) only if
    -- someone reset the sequence, which takes the full check.
    IF pg_catalog.pg_sequence_last_value('public.tenant_write_guard_flag'::pg_catalog.regclass)
       OPERATOR(pg_catalog.=) 0 THEN
        RETURN NULL;
    END IF;
    -- The transition table is visible only here, so its tenants are read here.
    IF TG_ARGV[0] OPERATOR(pg_catalog.=) 'tenant_id' THEN
        SELECT pg_catalog.array_agg(DISTINCT r.tenant_id::pg_catalog.text) INTO v_tenants
        FROM new_rows r;
    ELSE
        EXECUTE pg_catalog.format(
            'SELECT pg_catalog.array_agg(DISTINCT r.%I::pg_catalog.text) FROM new_rows r',
            TG_ARGV[0])
        INTO v_tenants;
    END IF;
    PERFORM public.tenant_write_guard_check(v_tenants, TG_OP, TG_TABLE_NAME);
    RETURN NULL;
END
$$;

-- The full check: fail if one of p_tenants is being deprovisioned. SECURITY
-- DEFINER so that it reads every tenant row whatever the writer's row-level
-- security allows it to see.
CREATE FUNCTION tenant_write_guard_check(p_tenants text[], p_op text, p_table text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_tenant text;
BEGIN
    -- Under REPEATABLE READ or SERIALIZABLE, lock the statement's tenants
    -- first: a status changed since this transaction's snapshot then fails
    -- the lock (40001) instead of being read as it was.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        PERFORM 1 FROM tenants WHERE id = ANY (p_tenants) FOR SHARE;
    END IF;
    SELECT id INTO v_tenant FROM tenants
    WHERE id = ANY (p_tenants) AND status = 'deprovisioning'
    LIMIT 1;
    IF v_tenant IS NOT NULL THEN
        RAISE EXCEPTION 'tenant % is being deprovisioned: its rows cannot be written', v_tenant
            USING ERRCODE = 'CRM01', HINT = 'TENANT_DEPROVISIONING',
                  DETAIL = format('%s on %s', p_op, p_table);
    END IF;
END
$$;

-- None of these is for the public API roles (0005_api_roles.sql).
REVOKE ALL ON FUNCTION tenant_write_guard_flag_lock(), tenant_write_guard_raise(),
    tenant_write_guard_lower(), tenant_write_guard_check(text[], text, text)
    FROM PUBLIC, anon, authenticated;

-- Attach the guard to one table whose p_column references tenants(id).
CREATE FUNCTION tenant_write_guard_attach(p_table regclass, p_column name) RETURNS void
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
BEGIN
    EXECUTE format(
        'CREATE TRIGGER tenant_write_guard_insert AFTER INSERT ON %s'
        ' REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT'
        ' EXECUTE FUNCTION tenant_write_guard(%L)', p_table, p_column);
    EXECUTE format(
        'CREATE TRIGGER tenant_write_guard_update AFTER UPDATE ON %s'
        ' REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT'
        ' EXECUTE FUNCTION tenant_write_guard(%L)', p_table, p_column);
END
$$;

-- The tables (and columns) that reference tenants(id) directly, and whether
-- each has the guard (enabled, and behind an immediate foreign key).
CREATE FUNCTION tenant_write_guard_coverage()
RETURNS TABLE (rel regclass, column_name name, guarded boolean)
LANGUAGE sql STABLE
SET search_path = public, pg_temp
AS $$
    SELECT con.conrelid::regclass, a.attname,
           EXISTS (SELECT 1 FROM pg_trigger tg
                   WHERE tg.tgrelid = con.conrelid AND tg.tgname = 'tenant_write_guard_insert'
                     AND tg.tgenabled <> 'D')
           AND EXISTS (SELECT 1 FROM pg_trigger tg
                       WHERE tg.tgrelid = con.conrelid AND tg.tgname = 'tenant_write_guard_update'
                         AND tg.tgenabled <> 'D')
           -- The guard runs after the foreign key checks of its statement; a
           -- deferred one would come after it, at commit.
           AND NOT con.condeferrable
    FROM pg_constraint con
    JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = con.conkey[1]
    WHERE con.contype = 'f'
      AND con.confrelid = 'public.tenants'::regclass
      AND cardinality(con.conkey) = 1
$$;

CREATE FUNCTION tenant_write_guard_assert() RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = public, pg_temp
AS $$
DECLARE
    v_unguarded text;
BEGIN
    SELECT string_agg(format('%s.%I', rel, column_name), ', ') INTO v_unguarded
    FROM tenant_write_guard_coverage() WHERE NOT guarded;
    IF v_unguarded IS NOT NULL THEN
        RAISE EXCEPTION 'tenant tables without the write guard: % (run tenant_write_guard_attach;'
            ' enable its triggers; make the foreign key to tenants not deferrable)', v_unguarded
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'TENANT_TABLE_UNGUARDED';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = 'tenants'::regclass AND tgname = 'tenant_write_guard_raise'
                     AND tgenabled = 'A') THEN
        RAISE EXCEPTION 'the trigger tenant_write_guard_raise on tenants is missing or not ALWAYS'
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'TENANT_TABLE_UNGUARDED';
    END IF;
END
$$;

DO $$
DECLARE
    v_table record;
BEGIN
    FOR v_table IN SELECT * FROM tenant_write_guard_coverage() WHERE NOT guarded LOOP
        PERFORM tenant_write_guard_attach(v_table.rel, v_table.column_name);
    END LOOP;
END
$$;
