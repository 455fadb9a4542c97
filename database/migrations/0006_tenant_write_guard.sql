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
-- The flag goes up (tenant_write_guard_raise, a trigger on tenants) in the
-- transaction that marks a tenant 'deprovisioning', before that commits. It
-- comes down only through tenant_write_guard_lower(), called after a
-- deprovisioning completes, and only if no tenant is left in that status.
-- Both hold one transaction-level advisory lock, so a lowering waits for a
-- marking in flight and then sees it. A flag left up (a marking rolled back,
-- a lowering that never ran) costs speed, never safety.
--
-- Writers racing the mark: every such row's foreign key check holds the
-- tenant row FOR KEY SHARE until its transaction ends, and the guard runs
-- after those checks (statement-level AFTER triggers fire after row-level
-- ones). deprovision_claim takes the tenant row FOR UPDATE before marking it.
-- So a writer that read the flag down held its lock before the claim's, and
-- the claim waited for it: its rows are deleted with the rest. A write that
-- comes later waits for the claim, and finds the flag up and the mark: under
-- READ COMMITTED the guard's query reads the new status; under REPEATABLE
-- READ or SERIALIZABLE, whose snapshot is older, the guard locks the tenant
-- row FOR SHARE, which fails with a serialization error (40001, retryable)
-- rather than read a stale status.
--
-- Tables added later get the guard from tenant_write_guard_attach(table,
-- column); deprovisioning refuses to start while a table that references
-- tenants(id) lacks it (tenant_write_guard_assert, called by
-- deprovision_assert_tables).

CREATE SEQUENCE tenant_write_guard_flag AS smallint MINVALUE 0 MAXVALUE 1;
-- Every role that may write a tenant table reads it (it tells no secret).
GRANT SELECT ON SEQUENCE tenant_write_guard_flag TO PUBLIC;

-- The tenants being deprovisioned: none, nearly always.
CREATE INDEX tenants_deprovisioning_idx ON tenants (id) WHERE status = 'deprovisioning';

-- The one lock that orders raising and lowering the flag.
CREATE FUNCTION tenant_write_guard_flag_lock() RETURNS void
LANGUAGE sql
SET search_path = public, pg_temp
AS $$ SELECT pg_advisory_xact_lock(hashtextextended('tenant_write_guard_flag', 0)) $$;

CREATE FUNCTION tenant_write_guard_raise() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM tenant_write_guard_flag_lock();
    PERFORM setval('tenant_write_guard_flag', 1);
    RETURN NULL;
END
$$;

CREATE TRIGGER tenant_write_guard_raise
AFTER INSERT OR UPDATE OF status ON tenants
FOR EACH ROW WHEN (NEW.status = 'deprovisioning')
EXECUTE FUNCTION tenant_write_guard_raise();

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
        RETURN false;
    END IF;
    PERFORM tenant_write_guard_flag_lock();
    IF EXISTS (SELECT 1 FROM tenants WHERE status = 'deprovisioning') THEN
        RETURN false;
    END IF;
    PERFORM setval('tenant_write_guard_flag', 0);
    RETURN true;
END
$$;
REVOKE EXECUTE ON FUNCTION tenant_write_guard_lower() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenant_write_guard_lower() TO service_role;

DO $$
BEGIN
    PERFORM setval('tenant_write_guard_flag',
                   CASE WHEN EXISTS (SELECT 1 FROM tenants WHERE status = 'deprovisioning')
                        THEN 1 ELSE 0 END);
END
$$;

CREATE FUNCTION tenant_write_guard() RETURNS trigger
LANGUAGE plpgsql
-- No SET search_path, unlike our other functions: switching it on every call
-- cost each write about as much as the rest of the guard (bench guard).
-- Relations are named with their schema instead; pg_catalog's functions and
-- operators come first in any search_path that does not list it explicitly.
AS $$
DECLARE
    v_tenant text;
BEGIN
    -- Down (0) while no tenant is being deprovisioned; unset (NULL) only if
    -- someone reset the sequence, which takes the full check.
    IF pg_catalog.pg_sequence_last_value('public.tenant_write_guard_flag') = 0 THEN
        RETURN NULL;
    END IF;
    IF current_setting('transaction_isolation') = 'read committed'
       AND NOT EXISTS (SELECT 1 FROM public.tenants WHERE status = 'deprovisioning') THEN
        RETURN NULL;
    END IF;
    -- Under REPEATABLE READ or SERIALIZABLE, lock the statement's tenants
    -- first: a status changed since this transaction's snapshot then fails
    -- the lock (40001) instead of being read as it was.
    -- The tenant column is the trigger's argument; the common name is read
    -- with static (plan-cached) queries, any other through EXECUTE.
    IF TG_ARGV[0] = 'tenant_id' THEN
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            PERFORM 1 FROM public.tenants t
            WHERE t.id IN (SELECT DISTINCT r.tenant_id FROM new_rows r)
            FOR SHARE;
        END IF;
        SELECT t.id INTO v_tenant FROM public.tenants t
        WHERE t.id IN (SELECT DISTINCT r.tenant_id FROM new_rows r)
          AND t.status = 'deprovisioning'
        LIMIT 1;
    ELSE
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            EXECUTE format(
                'SELECT 1 FROM public.tenants t WHERE t.id IN (SELECT DISTINCT r.%I FROM new_rows r)'
                ' FOR SHARE', TG_ARGV[0]);
        END IF;
        EXECUTE format(
            'SELECT t.id FROM public.tenants t WHERE t.id IN (SELECT DISTINCT r.%I FROM new_rows r)'
            ' AND t.status = ''deprovisioning'' LIMIT 1', TG_ARGV[0])
        INTO v_tenant;
    END IF;
    IF v_tenant IS NOT NULL THEN
        RAISE EXCEPTION 'tenant % is being deprovisioned: its rows cannot be written', v_tenant
            USING ERRCODE = 'CRM01', HINT = 'TENANT_DEPROVISIONING',
                  DETAIL = format('%s on %s', TG_OP, TG_TABLE_NAME);
    END IF;
    RETURN NULL;
END
$$;

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
-- each has the guard.
CREATE FUNCTION tenant_write_guard_coverage()
RETURNS TABLE (rel regclass, column_name name, guarded boolean)
LANGUAGE sql STABLE
SET search_path = public, pg_temp
AS $$
    SELECT con.conrelid::regclass, a.attname,
           EXISTS (SELECT 1 FROM pg_trigger tg
                   WHERE tg.tgrelid = con.conrelid AND tg.tgname = 'tenant_write_guard_insert')
           AND EXISTS (SELECT 1 FROM pg_trigger tg
                       WHERE tg.tgrelid = con.conrelid AND tg.tgname = 'tenant_write_guard_update')
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
        RAISE EXCEPTION 'tenant tables without the write guard: % (run tenant_write_guard_attach)',
            v_unguarded
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
