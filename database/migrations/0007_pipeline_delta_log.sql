-- Writers log deltas; compaction folds them into the aggregates (issue 6).
--
-- 0006 applied every writing transaction's deltas to the aggregates at
-- commit: a dozen keyed upserts per transaction, which made a one-row write
-- three times slower. Here a writer only appends its deltas to
-- pipeline_deltas, in the statement that wrote the rows (one INSERT from the
-- transition tables), and takes no lock on any aggregate row.
--
--   pipeline_deltas   (tenant, id)   what committed writes changed and the
--                                    aggregates do not hold yet
--   aggregates (0006)                n(e, s), q(e, c), k(e, c), clients per
--                                    stage, value(s, c) = sum_e n(e, s) * q(e, c)
--
-- Exactness: a delta commits or rolls back with the rows it describes, and
-- what a snapshot shows is always "aggregates + visible deltas" = the state
-- of the base tables in that snapshot:
--   * pipeline_summary reads the aggregates plus the tenant's pending deltas
--     (pipeline_current_*) in one snapshot. The cross term of a pending client
--     delta is dn(e, s) * q(e, c) + n(e, s) * dq(e, c) + dn * dq per email,
--     with n and q from the aggregates: index lookups, O(pending deltas).
--     Its cost depends on how far compaction is behind, never on the tenant's
--     size; a transaction sees its own writes.
--   * pipeline_compact() moves deltas into the aggregates: per tenant, ONE
--     statement deletes a batch of visible deltas and upserts their effect,
--     computed from the same snapshot, so every delta is applied exactly once.
--     Compactions of a tenant are serialized by the tenant's advisory lock
--     (taken with try: a busy tenant is skipped, never waited for). The CRM
--     service runs it in the background (crm_svc/compaction.py).
--   * A rebuild holds the tenant's lock, empties its aggregates, then in one
--     statement recomputes them and deletes the deltas visible to that same
--     snapshot; deltas of transactions still in flight commit later and are
--     compacted on top.
-- Writers never wait for compaction or for each other here; compaction never
-- waits (it only tries tenant locks); a rebuild or a status change waits for
-- one tenant lock and nothing else: nothing can deadlock.
--
-- Tenants being deprovisioned: deleting their rows logs nothing (so
-- deprovisioning costs no delta work), compaction skips them and their
-- summary is unreadable; deprovisioning deletes their pipeline_deltas rows
-- like any tenant table's. If such a tenant becomes active again, it is
-- rebuilt (section 4).
--
-- Switching over: tenants, clients and quotes are locked first, so no
-- transaction with 0006's commit-time work still queued is in flight; the
-- aggregates it left are exact and stay (no backfill: this migration is quick).

SET LOCAL lock_timeout = '10s';
LOCK TABLE tenants, clients, quotes IN SHARE ROW EXCLUSIVE MODE;

-- The commit-time machinery of 0006. The triggers on clients and quotes stay
-- (same names) and get the new bodies below.
DROP TABLE pipeline_apply_queue;  -- and its deferred trigger
DROP FUNCTION pipeline_apply_pending();
DROP FUNCTION pipeline_pending_open();


-- The log. No foreign key to tenants: a delta is written only with rows that
-- passed their own, and checking again would cost every write a lookup.
-- Ids come from a cached sequence (each session takes 1000 at a time): a
-- bulk statement's deltas would otherwise spend half their cost in nextval.
-- Nothing relies on their order; compaction only needs them unique.
-- Emptied by compaction as fast as it fills: vacuum it early.
CREATE TABLE pipeline_deltas (
    tenant_id     text NOT NULL,
    id            bigint GENERATED ALWAYS AS IDENTITY (CACHE 1000),
    email_key     text,            -- NULL: a client without a usable email (counts only)
    stage         text,            -- set on client deltas
    currency      char(3),         -- set on quote deltas
    clients       bigint NOT NULL DEFAULT 0,
    amount        numeric(38, 2) NOT NULL DEFAULT 0,
    priced_quotes bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, id),
    CHECK ((stage IS NULL) <> (currency IS NULL)),
    CHECK (currency IS NULL OR email_key IS NOT NULL)
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 2000);
ALTER TABLE pipeline_deltas ENABLE ROW LEVEL SECURITY;


-- 1. Writers: the statement's transition tables become deltas in one INSERT:
-- a delta per inserted or deleted row (grouping them here cost a single-row
-- write a fifth of its throughput; compaction groups them anyway). UPDATE
-- counts the old rows out and the new rows in, grouped by key, so that rows
-- whose tenant, email key and stage (or price and currency) did not change
-- cancel out and log nothing. Inserts and updates log whatever the tenant's
-- status (reading it would cost every write a lookup, and deprovisioning
-- deletes the log with the rest); deletes skip tenants being deprovisioned,
-- which is what makes deprovisioning cost no delta. A delete that sees the
-- status 'deprovisioning' takes the tenant's lock shared and reads the status
-- again (the loop's second pass), so that a concurrent change back to
-- 'active', which rebuilds under that lock held exclusively, cannot miss it.

CREATE FUNCTION pipeline_hold_tenants(p_tenants text[]) RETURNS void
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(pipeline_lock_space(), k)
    FROM (SELECT DISTINCT pipeline_tenant_lock_key(t) AS k FROM unnest(p_tenants) t ORDER BY 1) keys;
END
$$;

CREATE OR REPLACE FUNCTION pipeline_track_clients() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_only text[];     -- second pass: the tenants to read again
    v_skipped text[];  -- tenants being deprovisioned
BEGIN
    -- A trigger has only the transition tables of its own event.
    IF TG_OP = 'INSERT' THEN
        INSERT INTO pipeline_deltas (tenant_id, email_key, stage, clients)
        SELECT tenant_id, pipeline_email_key(email), pipeline_stage, 1
        FROM new_rows;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO pipeline_deltas (tenant_id, email_key, stage, clients)
        SELECT tenant_id, email_key, stage, sum(n)
        FROM (
            SELECT tenant_id, pipeline_email_key(email) AS email_key, pipeline_stage AS stage, 1 AS n
            FROM new_rows
            UNION ALL
            SELECT tenant_id, pipeline_email_key(email), pipeline_stage, -1
            FROM old_rows
        ) moved
        GROUP BY 1, 2, 3
        HAVING sum(n) <> 0;
    ELSE
        LOOP
            WITH t AS (
                SELECT id, status FROM tenants
                WHERE id IN (SELECT tenant_id FROM old_rows) AND (v_only IS NULL OR id = ANY (v_only))
            ), logged AS (
                INSERT INTO pipeline_deltas (tenant_id, email_key, stage, clients)
                SELECT r.tenant_id, pipeline_email_key(r.email), r.pipeline_stage, -1
                FROM old_rows r JOIN t ON t.id = r.tenant_id AND t.status <> 'deprovisioning'
            )
            SELECT array_agg(id) FILTER (WHERE status = 'deprovisioning') INTO v_skipped FROM t;
            EXIT WHEN v_skipped IS NULL OR v_only IS NOT NULL;
            PERFORM pipeline_hold_tenants(v_skipped);
            v_only := v_skipped;
        END LOOP;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION pipeline_track_quotes() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_only text[];
    v_skipped text[];
BEGIN
    -- Only priced quotes with a usable email can ever count.
    IF TG_OP = 'INSERT' THEN
        INSERT INTO pipeline_deltas (tenant_id, email_key, currency, amount, priced_quotes)
        SELECT tenant_id, pipeline_email_key(customer_email), currency, total_price, 1
        FROM new_rows
        WHERE total_price IS NOT NULL AND pipeline_email_key(customer_email) IS NOT NULL;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO pipeline_deltas (tenant_id, email_key, currency, amount, priced_quotes)
        SELECT tenant_id, email_key, currency, sum(amount), sum(n)
        FROM (
            SELECT tenant_id, pipeline_email_key(customer_email) AS email_key, currency,
                   total_price AS amount, 1 AS n
            FROM new_rows
            WHERE total_price IS NOT NULL
            UNION ALL
            SELECT tenant_id, pipeline_email_key(customer_email), currency, -total_price, -1
            FROM old_rows
            WHERE total_price IS NOT NULL
        ) moved
        WHERE email_key IS NOT NULL
        GROUP BY 1, 2, 3
        HAVING sum(n) <> 0 OR sum(amount) <> 0;
    ELSE
        LOOP
            WITH t AS (
                SELECT id, status FROM tenants
                WHERE id IN (SELECT tenant_id FROM old_rows) AND (v_only IS NULL OR id = ANY (v_only))
            ), logged AS (
                INSERT INTO pipeline_deltas (tenant_id, email_key, currency, amount, priced_quotes)
                SELECT r.tenant_id, pipeline_email_key(r.customer_email), r.currency,
                       -r.total_price, -1
                FROM old_rows r JOIN t ON t.id = r.tenant_id AND t.status <> 'deprovisioning'
                WHERE r.total_price IS NOT NULL AND pipeline_email_key(r.customer_email) IS NOT NULL
            )
            SELECT array_agg(id) FILTER (WHERE status = 'deprovisioning') INTO v_skipped FROM t;
            EXIT WHEN v_skipped IS NULL OR v_only IS NOT NULL;
            PERFORM pipeline_hold_tenants(v_skipped);
            v_only := v_skipped;
        END LOOP;
    END IF;
    RETURN NULL;
END
$$;


-- 2. A tenant's pending deltas, as changes to each aggregate: those with
-- id <= p_upto, or all with NULL. Compaction applies exactly these (it
-- deletes the same deltas in the same statement); reads add them to the
-- aggregates. Plain SQL without SET clauses, so that they are inlined and
-- planned with the caller's query.

CREATE FUNCTION pipeline_pending_email_clients(p_tenant_id text, p_upto bigint)
RETURNS TABLE (email_key text, stage text, clients bigint)
LANGUAGE sql STABLE
AS $$
    SELECT d.email_key, d.stage, sum(d.clients)::bigint
    FROM public.pipeline_deltas d
    WHERE d.tenant_id = p_tenant_id AND (p_upto IS NULL OR d.id <= p_upto)
      AND d.stage IS NOT NULL AND d.email_key IS NOT NULL
    GROUP BY 1, 2
    HAVING sum(d.clients) <> 0
$$;

CREATE FUNCTION pipeline_pending_email_quotes(p_tenant_id text, p_upto bigint)
RETURNS TABLE (email_key text, currency char(3), amount numeric, priced_quotes bigint)
LANGUAGE sql STABLE
AS $$
    SELECT d.email_key, d.currency, sum(d.amount), sum(d.priced_quotes)::bigint
    FROM public.pipeline_deltas d
    WHERE d.tenant_id = p_tenant_id AND (p_upto IS NULL OR d.id <= p_upto)
      AND d.currency IS NOT NULL
    GROUP BY 1, 2
    HAVING sum(d.priced_quotes) <> 0 OR sum(d.amount) <> 0
$$;

CREATE FUNCTION pipeline_pending_stage_clients(p_tenant_id text, p_upto bigint)
RETURNS TABLE (stage text, clients bigint)
LANGUAGE sql STABLE
AS $$
    SELECT d.stage, sum(d.clients)::bigint
    FROM public.pipeline_deltas d
    WHERE d.tenant_id = p_tenant_id AND (p_upto IS NULL OR d.id <= p_upto)
      AND d.stage IS NOT NULL
    GROUP BY 1
    HAVING sum(d.clients) <> 0
$$;

-- Per email, n'q' - nq = dn * q + n * dq + dn * dq, with n and q as the
-- aggregates hold them in this snapshot; the same with k for matches. n and q
-- are looked up key by key (OFFSET 0 keeps each lookup a parameterized index
-- scan): the statistics of a log that is mostly empty say nothing about a
-- batch, and a plan guessed from them can scan a whole tenant per delta. The
-- callers turn nested loops off for the rest (dc x dq, both unindexed).
CREATE FUNCTION pipeline_pending_stage_values(p_tenant_id text, p_upto bigint)
RETURNS TABLE (stage text, currency char(3), amount numeric, matches bigint)
LANGUAGE sql STABLE
AS $$
    WITH dc AS (SELECT * FROM public.pipeline_pending_email_clients(p_tenant_id, p_upto)),
         dq AS (SELECT * FROM public.pipeline_pending_email_quotes(p_tenant_id, p_upto))
    SELECT x.stage, x.currency, sum(x.amount), sum(x.matches)::bigint
    FROM (
        SELECT dc.stage, q.currency, dc.clients * q.amount AS amount,
               dc.clients * q.priced_quotes AS matches
        FROM dc
        CROSS JOIN LATERAL (
            SELECT q.currency, q.amount, q.priced_quotes
            FROM public.pipeline_email_quotes q
            WHERE q.tenant_id = p_tenant_id AND q.email_key = dc.email_key
            OFFSET 0
        ) q
        UNION ALL
        SELECT c.stage, dq.currency, c.clients * dq.amount, c.clients * dq.priced_quotes
        FROM dq
        CROSS JOIN LATERAL (
            SELECT c.stage, c.clients
            FROM public.pipeline_email_clients c
            WHERE c.tenant_id = p_tenant_id AND c.email_key = dq.email_key
            OFFSET 0
        ) c
        UNION ALL
        SELECT dc.stage, dq.currency, dc.clients * dq.amount, dc.clients * dq.priced_quotes
        FROM dc JOIN dq USING (email_key)
    ) x
    GROUP BY 1, 2
    HAVING sum(x.matches) <> 0 OR sum(x.amount) <> 0
$$;

-- The aggregates as of this snapshot: stored rows plus pending deltas.
CREATE FUNCTION pipeline_current_stage_clients(p_tenant_id text)
RETURNS TABLE (stage text, clients bigint)
LANGUAGE sql STABLE
AS $$
    SELECT x.stage, sum(x.clients)::bigint
    FROM (
        SELECT s.stage, s.clients FROM public.pipeline_stage_clients s WHERE s.tenant_id = p_tenant_id
        UNION ALL
        SELECT * FROM public.pipeline_pending_stage_clients(p_tenant_id, NULL)
    ) x
    GROUP BY 1
    HAVING sum(x.clients) <> 0
$$;

CREATE FUNCTION pipeline_current_stage_values(p_tenant_id text)
RETURNS TABLE (stage text, currency char(3), amount numeric, matches bigint)
LANGUAGE sql STABLE
AS $$
    SELECT x.stage, x.currency, sum(x.amount), sum(x.matches)::bigint
    FROM (
        SELECT v.stage, v.currency, v.amount, v.matches
        FROM public.pipeline_stage_values v WHERE v.tenant_id = p_tenant_id
        UNION ALL
        SELECT * FROM public.pipeline_pending_stage_values(p_tenant_id, NULL)
    ) x
    GROUP BY 1, 2
    HAVING sum(x.matches) <> 0 OR sum(x.amount) <> 0
$$;

CREATE FUNCTION pipeline_current_email_clients(p_tenant_id text)
RETURNS TABLE (email_key text, stage text, clients bigint)
LANGUAGE sql STABLE
AS $$
    SELECT x.email_key, x.stage, sum(x.clients)::bigint
    FROM (
        SELECT c.email_key, c.stage, c.clients
        FROM public.pipeline_email_clients c WHERE c.tenant_id = p_tenant_id
        UNION ALL
        SELECT * FROM public.pipeline_pending_email_clients(p_tenant_id, NULL)
    ) x
    GROUP BY 1, 2
    HAVING sum(x.clients) <> 0
$$;

CREATE FUNCTION pipeline_current_email_quotes(p_tenant_id text)
RETURNS TABLE (email_key text, currency char(3), amount numeric, priced_quotes bigint)
LANGUAGE sql STABLE
AS $$
    SELECT x.email_key, x.currency, sum(x.amount), sum(x.priced_quotes)::bigint
    FROM (
        SELECT q.email_key, q.currency, q.amount, q.priced_quotes
        FROM public.pipeline_email_quotes q WHERE q.tenant_id = p_tenant_id
        UNION ALL
        SELECT * FROM public.pipeline_pending_email_quotes(p_tenant_id, NULL)
    ) x
    GROUP BY 1, 2
    HAVING sum(x.priced_quotes) <> 0 OR sum(x.amount) <> 0
$$;


-- 3. Compaction: fold about p_max_deltas committed deltas into the
-- aggregates, spread over the tenants that have some: each tenant taken gets
-- an equal share of the batch, and when more tenants wait than one call takes
-- (c_max_tenants, or p_max_deltas if smaller) a random sample of them is taken,
-- so no tenant is starved. Tenants being deprovisioned are left out (their
-- deltas wait for deprovisioning to delete them); a tenant whose lock is held
-- (another compactor, a rebuild, a status change) is skipped; the deltas of a
-- tenant that no longer exists are discarded. A tenant's share is cut by delta
-- id, so it can also take a few deltas that commit while the call runs.
-- Returns {"compacted": deltas applied, "tenants": tenants compacted, "busy":
-- tenants skipped, "discarded": deltas of tenants gone, "more": whether a
-- tenant had more than its share or was busy}. Run it under READ COMMITTED (the default):
-- each statement must see what committed before it.
-- enable_seqscan off: a batch touches a few keys of large aggregate tables,
-- which index probes find; left alone the planner may hash a whole table.
-- enable_nestloop off: see pipeline_pending_stage_values.

CREATE FUNCTION pipeline_compact(p_max_deltas integer DEFAULT 10000) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = public, pg_temp
SET enable_seqscan = off
SET enable_nestloop = off
AS $$
DECLARE
    -- Advisory locks share the lock table: bound how many one call takes.
    c_max_tenants CONSTANT integer := 200;
    v_candidates text[];
    v_tenants text[] := '{}';
    v_tenant text;
    v_status text;
    v_busy integer := 0;
    v_limit integer;
    v_discarded bigint := 0;
    v_share integer;
    v_upto bigint;
    v_picked bigint;
    v_compacted bigint := 0;
    v_more boolean;
    -- Keys of rows this batch brought to zero (only those can be at zero).
    v_zero_client_emails text[];
    v_zero_quote_emails text[];
    v_zero_stages text[];
    v_zero_value_stages text[];
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pipeline_compact must run under READ COMMITTED'
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'READ_COMMITTED_REQUIRED';
    END IF;
    IF p_max_deltas IS NULL OR p_max_deltas < 1 THEN
        RAISE EXCEPTION 'p_max_deltas must be at least 1'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'INVALID_BATCH_SIZE';
    END IF;

    -- A full rebuild locks the log against this (tenant locks would be too
    -- many): wait for it here, up front, so that every statement below plainly
    -- runs after it (PostgreSQL 14+ takes a statement's snapshot after its
    -- locks, so they would see its result anyway, but need not rely on that).
    LOCK TABLE pipeline_deltas IN ROW EXCLUSIVE MODE;

    -- The tenants with deltas (one index probe each: a loose index scan),
    -- except those being deprovisioned; a random sample if there are too many.
    v_limit := least(c_max_tenants, p_max_deltas);
    v_candidates := ARRAY(
        WITH RECURSIVE t (id) AS (
            SELECT min(tenant_id) FROM pipeline_deltas
            UNION ALL
            SELECT (SELECT min(d.tenant_id) FROM pipeline_deltas d WHERE d.tenant_id > t.id)
            FROM t WHERE t.id IS NOT NULL
        )
        SELECT t.id FROM t LEFT JOIN tenants x ON x.id = t.id
        WHERE t.id IS NOT NULL AND x.status IS DISTINCT FROM 'deprovisioning'
        ORDER BY random()
        LIMIT v_limit + 1);
    v_more := cardinality(v_candidates) > v_limit;

    FOREACH v_tenant IN ARRAY v_candidates[1:v_limit] LOOP
        IF NOT pg_try_advisory_xact_lock(pipeline_lock_space(), pipeline_tenant_lock_key(v_tenant)) THEN
            v_busy := v_busy + 1;
        ELSE
            -- Read after the lock: a status change holds it until it commits.
            v_status := (SELECT status FROM tenants WHERE id = v_tenant);
            IF v_status IS NULL THEN
                -- The tenant is gone: what it left here counts for nothing.
                DELETE FROM pipeline_deltas WHERE tenant_id = v_tenant;
                GET DIAGNOSTICS v_picked = ROW_COUNT;
                v_discarded := v_discarded + v_picked;
            ELSIF v_status <> 'deprovisioning' THEN
                v_tenants := v_tenants || v_tenant;
            END IF;
        END IF;
    END LOOP;
    -- A busy tenant is being compacted (or rebuilt) elsewhere: it may have more.
    v_more := v_more OR v_busy > 0;
    IF cardinality(v_tenants) = 0 THEN
        RETURN jsonb_build_object('compacted', 0, 'tenants', 0, 'busy', v_busy,
                                  'discarded', v_discarded, 'more', v_more);
    END IF;
    v_share := greatest(p_max_deltas / cardinality(v_tenants), 1);

    FOREACH v_tenant IN ARRAY v_tenants LOOP
        -- This batch: the tenant's first v_share deltas by id (all, when fewer).
        v_upto := (SELECT d.id FROM pipeline_deltas d WHERE d.tenant_id = v_tenant
                   ORDER BY d.id OFFSET v_share - 1 LIMIT 1);
        v_more := v_more OR v_upto IS NOT NULL;

        -- One statement, one snapshot: the deltas deleted are exactly those the
        -- pending_* functions count, and the aggregates they read (n, q) are
        -- those before this statement's own upserts.
        WITH picked AS (
            DELETE FROM pipeline_deltas d
            WHERE d.tenant_id = v_tenant AND (v_upto IS NULL OR d.id <= v_upto)
            RETURNING 1
        ), stage_values AS (
            INSERT INTO pipeline_stage_values AS v (tenant_id, stage, currency, amount, matches)
            SELECT v_tenant, p.stage, p.currency, p.amount, p.matches
            FROM pipeline_pending_stage_values(v_tenant, v_upto) p
            ORDER BY p.stage, p.currency
            ON CONFLICT (tenant_id, stage, currency) DO UPDATE
                SET amount = v.amount + excluded.amount, matches = v.matches + excluded.matches
            RETURNING v.stage, v.currency, v.matches
        ), email_clients AS (
            INSERT INTO pipeline_email_clients AS c (tenant_id, email_key, stage, clients)
            SELECT v_tenant, p.email_key, p.stage, p.clients
            FROM pipeline_pending_email_clients(v_tenant, v_upto) p
            ON CONFLICT (tenant_id, email_key, stage) DO UPDATE
                SET clients = c.clients + excluded.clients
            RETURNING c.email_key, c.stage, c.clients
        ), email_quotes AS (
            INSERT INTO pipeline_email_quotes AS q (tenant_id, email_key, currency, amount, priced_quotes)
            SELECT v_tenant, p.email_key, p.currency, p.amount, p.priced_quotes
            FROM pipeline_pending_email_quotes(v_tenant, v_upto) p
            ON CONFLICT (tenant_id, email_key, currency) DO UPDATE
                SET amount = q.amount + excluded.amount,
                    priced_quotes = q.priced_quotes + excluded.priced_quotes
            RETURNING q.email_key, q.currency, q.priced_quotes
        ), stage_clients AS (
            INSERT INTO pipeline_stage_clients AS s (tenant_id, stage, clients)
            SELECT v_tenant, p.stage, p.clients
            FROM pipeline_pending_stage_clients(v_tenant, v_upto) p
            ORDER BY p.stage
            ON CONFLICT (tenant_id, stage) DO UPDATE SET clients = s.clients + excluded.clients
            RETURNING s.stage, s.clients
        )
        -- Rows only reach zero through a negative delta: collect those keys.
        SELECT (SELECT count(*) FROM picked),
               ARRAY(SELECT DISTINCT email_key FROM email_clients WHERE clients = 0),
               ARRAY(SELECT DISTINCT email_key FROM email_quotes WHERE priced_quotes = 0),
               ARRAY(SELECT stage FROM stage_clients WHERE clients = 0),
               ARRAY(SELECT DISTINCT stage FROM stage_values WHERE matches = 0)
        INTO v_picked, v_zero_client_emails, v_zero_quote_emails, v_zero_stages,
             v_zero_value_stages;
        v_compacted := v_compacted + v_picked;

        IF cardinality(v_zero_client_emails) > 0 THEN
            DELETE FROM pipeline_email_clients
            WHERE tenant_id = v_tenant AND email_key = ANY (v_zero_client_emails) AND clients = 0;
        END IF;
        IF cardinality(v_zero_quote_emails) > 0 THEN
            DELETE FROM pipeline_email_quotes
            WHERE tenant_id = v_tenant AND email_key = ANY (v_zero_quote_emails)
              AND priced_quotes = 0;
        END IF;
        IF cardinality(v_zero_stages) > 0 THEN
            DELETE FROM pipeline_stage_clients
            WHERE tenant_id = v_tenant AND stage = ANY (v_zero_stages) AND clients = 0;
        END IF;
        IF cardinality(v_zero_value_stages) > 0 THEN
            DELETE FROM pipeline_stage_values
            WHERE tenant_id = v_tenant AND stage = ANY (v_zero_value_stages) AND matches = 0;
        END IF;
    END LOOP;

    RETURN jsonb_build_object('compacted', v_compacted, 'tenants', cardinality(v_tenants),
                              'busy', v_busy, 'discarded', v_discarded, 'more', v_more);
END
$$;


-- 4. Rebuild the aggregates of one tenant (or of all with NULL) from the base
-- tables, online. One tenant: under its lock (compaction skips it meanwhile),
-- its aggregates are emptied, then one statement recomputes them and deletes
-- the deltas visible in that same snapshot; writers go on undisturbed. All
-- tenants: clients, quotes and the log are locked against writes instead
-- (one advisory lock per tenant could exhaust the lock table). Tenants being
-- deprovisioned are only emptied. Returns the number of tenants rebuilt. Used
-- by operators (`python -m crm_svc verify --repair`), after TRUNCATE and when
-- a tenant leaves 'deprovisioning'. Run it under READ COMMITTED (the default).

CREATE OR REPLACE FUNCTION pipeline_aggregates_rebuild(p_tenant_id text DEFAULT NULL) RETURNS integer
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    v_all text[];
    v_live text[];
BEGIN
    IF p_tenant_id IS NULL THEN
        LOCK TABLE clients, quotes, pipeline_deltas IN SHARE ROW EXCLUSIVE MODE;
    ELSE
        PERFORM pg_advisory_xact_lock(pipeline_lock_space(), pipeline_tenant_lock_key(p_tenant_id));
    END IF;
    -- New statements from here on: they see what committed while we waited.
    v_all := ARRAY(SELECT id FROM tenants WHERE p_tenant_id IS NULL OR id = p_tenant_id);
    v_live := ARRAY(SELECT id FROM tenants WHERE id = ANY (v_all) AND status <> 'deprovisioning');

    DELETE FROM pipeline_stage_values WHERE tenant_id = ANY (v_all);
    DELETE FROM pipeline_stage_clients WHERE tenant_id = ANY (v_all);
    DELETE FROM pipeline_email_clients WHERE tenant_id = ANY (v_all);
    DELETE FROM pipeline_email_quotes WHERE tenant_id = ANY (v_all);

    WITH forgotten AS (
        DELETE FROM pipeline_deltas WHERE tenant_id = ANY (v_all)
    ), ec AS (
        SELECT * FROM pipeline_expected_email_clients(v_live)
    ), eq AS (
        SELECT * FROM pipeline_expected_email_quotes(v_live)
    ), email_clients AS (
        INSERT INTO pipeline_email_clients (tenant_id, email_key, stage, clients)
        SELECT * FROM ec
    ), email_quotes AS (
        INSERT INTO pipeline_email_quotes (tenant_id, email_key, currency, amount, priced_quotes)
        SELECT * FROM eq
    ), stage_clients AS (
        INSERT INTO pipeline_stage_clients (tenant_id, stage, clients)
        SELECT * FROM pipeline_expected_stage_clients(v_live)
    )
    INSERT INTO pipeline_stage_values (tenant_id, stage, currency, amount, matches)
    SELECT c.tenant_id, c.stage, q.currency, sum(c.clients * q.amount), sum(c.clients * q.priced_quotes)
    FROM ec c
    JOIN eq q USING (tenant_id, email_key)
    GROUP BY 1, 2, 3;

    RETURN cardinality(v_live);
END
$$;

-- pipeline_emails was 0006's per-email lock; compaction is serialized per tenant.
DROP TABLE pipeline_emails;


-- 5. The summary reads the aggregates plus the pending deltas.
-- The log's statistics are usually those of an almost empty table: left
-- alone, the planner seq-scans all of it (every tenant's deltas and dead
-- rows) rather than probe the tenant's; and see pipeline_pending_stage_values.
CREATE OR REPLACE FUNCTION pipeline_summary(p_tenant_id text) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = public, pg_temp
SET enable_seqscan = off
SET enable_nestloop = off
AS $$
DECLARE
    v_status text;
    v_summary jsonb;
BEGIN
    SELECT status INTO v_status FROM tenants WHERE id = p_tenant_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'tenant % does not exist', p_tenant_id
            USING ERRCODE = 'no_data_found', HINT = 'TENANT_NOT_FOUND';
    END IF;
    IF v_status = 'deprovisioning' THEN
        RAISE EXCEPTION 'tenant % is being deprovisioned', p_tenant_id
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'TENANT_DEPROVISIONING';
    END IF;

    -- At most 6 + 6 x currencies rows, plus the deltas not compacted yet.
    WITH stage_counts AS (
        SELECT stage, clients AS client_count
        FROM pipeline_current_stage_clients(p_tenant_id)
    ),
    stage_values AS (
        -- A stage shows a currency iff some client there has a priced quote in it.
        SELECT stage, currency, amount
        FROM pipeline_current_stage_values(p_tenant_id)
        WHERE matches > 0
    )
    SELECT jsonb_build_object(
        'stages', (
            SELECT jsonb_agg(jsonb_build_object(
                       'stage', s.stage,
                       'open', s.open,
                       'client_count', coalesce(c.client_count, 0),
                       'value', coalesce((
                           SELECT jsonb_agg(jsonb_build_object(
                                      'currency', v.currency, 'amount', v.amount::text)
                                  ORDER BY v.currency)
                           FROM stage_values v
                           WHERE v.stage = s.stage), '[]'::jsonb))
                   ORDER BY s.position)
            FROM pipeline_stages s
            LEFT JOIN stage_counts c ON c.stage = s.stage),
        'total_clients', (SELECT coalesce(sum(client_count), 0) FROM stage_counts),
        'open_value', coalesce((
            SELECT jsonb_agg(jsonb_build_object('currency', currency, 'amount', amount::text)
                   ORDER BY currency)
            FROM (
                SELECT v.currency, sum(v.amount) AS amount
                FROM stage_values v
                JOIN pipeline_stages s ON s.stage = v.stage
                WHERE s.open
                GROUP BY v.currency
            ) open_sums), '[]'::jsonb),
        'computed_at', clock_timestamp()
    ) INTO v_summary;
    RETURN v_summary;
END
$$;


-- 6. Verification: the current aggregates (stored plus pending) against a
-- recomputation, table by table, in one snapshot; and how many deltas wait.
CREATE OR REPLACE FUNCTION pipeline_verify(p_tenant_id text) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = public, pg_temp
SET enable_nestloop = off
AS $$
DECLARE
    v_status text;
    v_tenants text[] := ARRAY[p_tenant_id];
    v_aggregated jsonb;
    v_recomputed jsonb;
    v_rows jsonb;
    v_pending bigint;
BEGIN
    SELECT status INTO v_status FROM tenants WHERE id = p_tenant_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'tenant % does not exist', p_tenant_id
            USING ERRCODE = 'no_data_found', HINT = 'TENANT_NOT_FOUND';
    END IF;
    IF v_status = 'deprovisioning' THEN
        -- Not maintained on purpose; its summary is unreadable anyway.
        RETURN jsonb_build_object('tenant_id', p_tenant_id, 'status', v_status, 'checked', false);
    END IF;

    v_aggregated := pipeline_summary(p_tenant_id) - 'computed_at';
    v_recomputed := pipeline_summary_recompute(p_tenant_id) - 'computed_at';
    v_pending := (SELECT count(*) FROM pipeline_deltas WHERE tenant_id = p_tenant_id);

    SELECT jsonb_build_object(
        'pipeline_email_clients', (
            SELECT count(*)
            FROM pipeline_current_email_clients(p_tenant_id) a
            FULL JOIN pipeline_expected_email_clients(v_tenants) e USING (email_key, stage)
            WHERE a.clients IS DISTINCT FROM e.clients),
        'pipeline_email_quotes', (
            SELECT count(*)
            FROM pipeline_current_email_quotes(p_tenant_id) a
            FULL JOIN pipeline_expected_email_quotes(v_tenants) e USING (email_key, currency)
            WHERE a.amount IS DISTINCT FROM e.amount
               OR a.priced_quotes IS DISTINCT FROM e.priced_quotes),
        'pipeline_stage_clients', (
            SELECT count(*)
            FROM pipeline_current_stage_clients(p_tenant_id) a
            FULL JOIN pipeline_expected_stage_clients(v_tenants) e USING (stage)
            WHERE a.clients IS DISTINCT FROM e.clients),
        'pipeline_stage_values', (
            SELECT count(*)
            FROM pipeline_current_stage_values(p_tenant_id) a
            FULL JOIN (
                SELECT c.stage, q.currency, sum(c.clients * q.amount) AS amount,
                       sum(c.clients * q.priced_quotes) AS matches
                FROM pipeline_expected_email_clients(v_tenants) c
                JOIN pipeline_expected_email_quotes(v_tenants) q USING (email_key)
                GROUP BY 1, 2
            ) e USING (stage, currency)
            WHERE a.amount IS DISTINCT FROM e.amount OR a.matches IS DISTINCT FROM e.matches)
    ) INTO v_rows;

    RETURN jsonb_build_object(
        'tenant_id', p_tenant_id,
        'status', v_status,
        'checked', true,
        'drift', v_aggregated IS DISTINCT FROM v_recomputed
                 OR EXISTS (SELECT 1 FROM jsonb_each_text(v_rows) WHERE value <> '0'),
        'summary_matches', v_aggregated = v_recomputed,
        'aggregated', v_aggregated,
        'recomputed', v_recomputed,
        'mismatched_rows', v_rows,
        'pending_deltas', v_pending);
END
$$;
