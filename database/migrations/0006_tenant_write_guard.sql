-- Nothing is writable for a tenant being removed: once its status is
-- 'deprovisioning', an INSERT into any table that references tenants(id), or
-- an UPDATE of such a row, fails with SQLSTATE CRM01 and a message naming the
-- tenant (the services map it to FAILED_PRECONDITION, TENANT_DEPROVISIONING).
-- DELETE stays allowed: deprovisioning deletes.
--
-- One statement-level trigger per table and event. Under READ COMMITTED it
-- first asks whether any tenant at all is being deprovisioned (a probe of an
-- index that is empty almost all the time), and only then reads the
-- statement's transition table: a write pays about half of what the full
-- check costs, and the full check only while some deprovisioning runs.
--
-- Writers racing the status change: every such row's foreign key check holds
-- the tenant row FOR KEY SHARE until its transaction ends, and
-- deprovision_claim takes the tenant row FOR UPDATE before changing the
-- status. So the change waits for writers already in flight (their rows are
-- deleted with the rest), and a write that comes later waits for the change
-- and then sees it: under READ COMMITTED the guard's query reads the new
-- status; under REPEATABLE READ or SERIALIZABLE, whose snapshot is older, the
-- guard locks the tenant row FOR SHARE, which fails with a serialization
-- error (40001, retryable) rather than read a stale status.
--
-- Tables added later get the guard from tenant_write_guard_attach(table,
-- column); deprovisioning refuses to start while a table that references
-- tenants(id) lacks it (tenant_write_guard_assert, called by
-- deprovision_assert_tables).

-- The tenants being deprovisioned: none, nearly always.
CREATE INDEX tenants_deprovisioning_idx ON tenants (id) WHERE status = 'deprovisioning';

CREATE FUNCTION tenant_write_guard() RETURNS trigger
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    v_tenant text;
BEGIN
    IF current_setting('transaction_isolation') = 'read committed'
       AND NOT EXISTS (SELECT 1 FROM tenants WHERE status = 'deprovisioning') THEN
        RETURN NULL;
    END IF;
    -- Under REPEATABLE READ or SERIALIZABLE, lock the statement's tenants
    -- first: a status changed since this transaction's snapshot then fails
    -- the lock (40001) instead of being read as it was.
    -- The tenant column is the trigger's argument; the common name is read
    -- with static (plan-cached) queries, any other through EXECUTE.
    IF TG_ARGV[0] = 'tenant_id' THEN
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            PERFORM 1 FROM tenants t
            WHERE t.id IN (SELECT DISTINCT r.tenant_id FROM new_rows r)
            FOR SHARE;
        END IF;
        SELECT t.id INTO v_tenant FROM tenants t
        WHERE t.id IN (SELECT DISTINCT r.tenant_id FROM new_rows r)
          AND t.status = 'deprovisioning'
        LIMIT 1;
    ELSE
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            EXECUTE format(
                'SELECT 1 FROM tenants t WHERE t.id IN (SELECT DISTINCT r.%I FROM new_rows r)'
                ' FOR SHARE', TG_ARGV[0]);
        END IF;
        EXECUTE format(
            'SELECT t.id FROM tenants t WHERE t.id IN (SELECT DISTINCT r.%I FROM new_rows r)'
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
