-- Per-tenant pipeline aggregates kept current by triggers (issue 6), so that
-- pipeline_summary(tenant) reads O(stages x currencies) rows at any tenant
-- size, exactly equal to the full scan (kept as pipeline_summary_recompute).
--
-- Model (design §6 semantics; email key = pipeline_email_key(email), 0002):
--   pipeline_email_clients  (tenant, email key, stage)    n(e, s): clients
--   pipeline_email_quotes   (tenant, email key, currency) q(e, c): sum of priced quotes,
--                                                          k(e, c): how many are priced
--   pipeline_emails         (tenant, email key)           totals per email; its row is also
--                                                          the lock that orders all work on e
--   pipeline_stage_clients  (tenant, stage)               clients per stage, NULL emails included
--   pipeline_stage_values   (tenant, stage, currency)     value(s, c) = sum_e n(e, s) * q(e, c),
--                                                          matches(s, c) = sum_e n(e, s) * k(e, c)
-- A stage shows a currency iff matches > 0 (a 0.00 sum of real prices is shown;
-- a currency whose prices are all NULL is not), so rows at zero are deleted.
--
-- How changes flow:
--   1. Statement-level AFTER triggers on clients and quotes turn their transition
--      tables into deltas per key and append them to a temporary table of the
--      session (pg_temp.pipeline_pending). No aggregate row is touched, no lock
--      taken, and a bulk statement costs one grouped insert.
--   2. At commit, a deferred constraint trigger applies the transaction's deltas
--      (pipeline_apply_pending) taking locks in one fixed order: the tenant lock
--      (shared), then emails, stage values and stage clients, each in key order
--      (the email clients and email quotes rows change under their email's lock,
--      so nobody else can hold them). Aggregate locks are only taken while committing,
--      always in that order, and a committing transaction waits for nothing else:
--      writers cannot deadlock on the aggregates however their statements
--      interleave, and the hot rows (a tenant's stage counts) are held only for
--      the length of a commit.
--   3. A client change and a quote change for the same email in two concurrent
--      transactions both lock that email's row before reading n and q; under READ
--      COMMITTED the second one then sees the first one's committed state, so the
--      cross term (new client x new quote) is counted exactly once. Under
--      REPEATABLE READ / SERIALIZABLE the second one gets a serialization failure
--      (40001, retryable) instead of a stale read.
--   Consequences: inside a writing transaction, pipeline_summary does not count
--   that transaction's own changes yet (they are applied when it commits); and a
--   transaction that wrote clients or quotes cannot PREPARE TRANSACTION (it used
--   a temporary table).
--
-- Deprovisioning (agreed rule): nothing is maintained for a tenant whose status
-- is 'deprovisioning', so deleting its rows costs no aggregate work and cannot
-- resurrect aggregate rows; the aggregate tables have a tenant_id and are
-- deleted with the rest of its data. Each tenant has an advisory lock: commits
-- applying deltas hold it shared and read the status after taking it; a status
-- change and a rebuild hold it exclusively. So a status change waits for
-- in-flight commits, and later commits see the new status.
--
-- Backfill: this migration locks tenants, clients and quotes in SHARE ROW
-- EXCLUSIVE mode, up front and in that order (CREATE TRIGGER needs that lock on
-- each of them anyway), and fills the aggregates in the same transaction.
-- Reads, including pipeline_summary, continue; writes wait for the backfill and
-- then go through the triggers, so no write is counted twice or missed. The
-- wait is what inserting the aggregate rows costs, about 20 us a row (some 3
-- per client): 80 s for 1.3M clients and 2.6M quotes on the 2-CPU bench
-- machine. Beyond a few million clients, building tenant by tenant after the
-- migration (pipeline_aggregates_rebuild is online) would avoid that stall. The
-- lock_timeout makes the migration give up, rather than stall every writer
-- behind it, if a long transaction holds the tables; run it again later.

SET LOCAL lock_timeout = '10s';
LOCK TABLE tenants, clients, quotes IN SHARE ROW EXCLUSIVE MODE;


-- Aggregate tables. tenant_id leads every key and references tenants (design §5);
-- deprovisioning discovers and empties them like any tenant table.
-- Amounts have scale 2 like the prices, so they print exactly as sum() over
-- numeric(14, 2) does; 36 integer digits are beyond any real sum.

CREATE TABLE pipeline_emails (
    tenant_id     text NOT NULL REFERENCES tenants (id),
    email_key     text NOT NULL,
    clients       bigint NOT NULL,
    priced_quotes bigint NOT NULL,
    PRIMARY KEY (tenant_id, email_key)
);

CREATE TABLE pipeline_email_clients (
    tenant_id text NOT NULL REFERENCES tenants (id),
    email_key text NOT NULL,
    stage     text NOT NULL,
    clients   bigint NOT NULL,
    PRIMARY KEY (tenant_id, email_key, stage)
);

CREATE TABLE pipeline_email_quotes (
    tenant_id     text NOT NULL REFERENCES tenants (id),
    email_key     text NOT NULL,
    currency      char(3) NOT NULL,
    amount        numeric(38, 2) NOT NULL,
    priced_quotes bigint NOT NULL,
    PRIMARY KEY (tenant_id, email_key, currency)
);

-- The two tables every summary reads and most commits update: a low fillfactor
-- keeps their updates HOT.
CREATE TABLE pipeline_stage_clients (
    tenant_id text NOT NULL REFERENCES tenants (id),
    stage     text NOT NULL,
    clients   bigint NOT NULL,
    PRIMARY KEY (tenant_id, stage)
) WITH (fillfactor = 50);

CREATE TABLE pipeline_stage_values (
    tenant_id text NOT NULL REFERENCES tenants (id),
    stage     text NOT NULL,
    currency  char(3) NOT NULL,
    amount    numeric(38, 2) NOT NULL,
    -- (client, priced quote) pairs behind amount; the row exists iff > 0.
    matches   bigint NOT NULL,
    PRIMARY KEY (tenant_id, stage, currency)
) WITH (fillfactor = 50);


-- Tenant locks. A transaction holds its tenants' lock shared while it applies
-- deltas at commit (and when it changes rows of a tenant it does not maintain);
-- a status change and a rebuild hold it exclusively. Advisory locks: nothing
-- is written for them, unlike a row lock on the busy tenants row.
CREATE FUNCTION pipeline_tenant_lock_key(p_tenant_id text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN hashtext(p_tenant_id);
-- The first key of every advisory lock taken here (ASCII 'pipe').
CREATE FUNCTION pipeline_lock_space() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 1885958245;


-- A transaction's pending deltas live in a temporary table of its session,
-- created on first use: only the session's own rows are in it, and it is not
-- tenant data. The apply step deletes what it applied and truncates the table
-- once dead rows have grown it (ON COMMIT DELETE ROWS would truncate the file
-- at every commit, which costs more than the rest of the apply together).
CREATE FUNCTION pipeline_pending_open() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    CREATE TEMP TABLE IF NOT EXISTS pipeline_pending (
        tenant        text NOT NULL,
        email_key     text,           -- NULL: clients without a usable email (counts only)
        stage         text,           -- set on client deltas
        currency      char(3),        -- set on quote deltas
        clients       bigint NOT NULL DEFAULT 0,
        amount        numeric NOT NULL DEFAULT 0.00,
        priced_quotes bigint NOT NULL DEFAULT 0
    );
END
$$;

-- Inserting a row here queues the transaction's one deferred apply. The row
-- is deleted at once (the queued trigger fires all the same), so the table
-- stays empty and is never searched. The transaction-local setting
-- crm_pipeline.apply_queued remembers that the apply is queued; a rolled-back
-- savepoint undoes both together.
CREATE UNLOGGED TABLE pipeline_apply_queue (
    queued boolean NOT NULL
);


-- 1. Statement triggers: transition tables -> deltas per key, appended to the
-- pending table. UPDATE counts the old rows out and the new rows in; rows
-- whose tenant, email key and stage (or price and currency) did not change
-- cancel out. Tenants being deprovisioned are skipped (and checked again at
-- commit); this transaction then holds their lock shared, so that a rebuild
-- when such a tenant becomes active again waits for these rows.

CREATE FUNCTION pipeline_track_clients() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_live text[];
    v_skipped text[];
    v_queue tid;
    v_setting text;
BEGIN
    -- A trigger has only the transition tables of its own event.
    IF TG_OP = 'INSERT' THEN
        SELECT coalesce(array_agg(id) FILTER (WHERE status <> 'deprovisioning'), '{}'),
               coalesce(array_agg(id) FILTER (WHERE status = 'deprovisioning'), '{}')
        INTO v_live, v_skipped
        FROM tenants WHERE id = ANY (ARRAY(SELECT DISTINCT tenant_id FROM new_rows));
    ELSIF TG_OP = 'DELETE' THEN
        SELECT coalesce(array_agg(id) FILTER (WHERE status <> 'deprovisioning'), '{}'),
               coalesce(array_agg(id) FILTER (WHERE status = 'deprovisioning'), '{}')
        INTO v_live, v_skipped
        FROM tenants WHERE id = ANY (ARRAY(SELECT DISTINCT tenant_id FROM old_rows));
    ELSE
        SELECT coalesce(array_agg(id) FILTER (WHERE status <> 'deprovisioning'), '{}'),
               coalesce(array_agg(id) FILTER (WHERE status = 'deprovisioning'), '{}')
        INTO v_live, v_skipped
        FROM tenants
        WHERE id = ANY (ARRAY(SELECT tenant_id FROM new_rows UNION SELECT tenant_id FROM old_rows));
    END IF;
    IF cardinality(v_skipped) > 0 THEN
        PERFORM pg_advisory_xact_lock_shared(pipeline_lock_space(), pipeline_tenant_lock_key(t))
        FROM unnest(v_skipped) t;
    END IF;
    IF cardinality(v_live) = 0 THEN
        RETURN NULL;
    END IF;
    IF to_regclass('pg_temp.pipeline_pending') IS NULL THEN
        PERFORM pipeline_pending_open();
    END IF;

    IF TG_OP = 'INSERT' THEN
        INSERT INTO pg_temp.pipeline_pending (tenant, email_key, stage, clients)
        SELECT tenant_id, pipeline_email_key(email), pipeline_stage, count(*)
        FROM new_rows
        WHERE tenant_id = ANY (v_live)
        GROUP BY 1, 2, 3;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO pg_temp.pipeline_pending (tenant, email_key, stage, clients)
        SELECT tenant_id, pipeline_email_key(email), pipeline_stage, -count(*)
        FROM old_rows
        WHERE tenant_id = ANY (v_live)
        GROUP BY 1, 2, 3;
    ELSE
        INSERT INTO pg_temp.pipeline_pending (tenant, email_key, stage, clients)
        SELECT tenant_id, email_key, stage, sum(n)
        FROM (
            SELECT tenant_id, pipeline_email_key(email) AS email_key, pipeline_stage AS stage, 1 AS n
            FROM new_rows
            UNION ALL
            SELECT tenant_id, pipeline_email_key(email), pipeline_stage, -1
            FROM old_rows
        ) moved
        WHERE tenant_id = ANY (v_live)
        GROUP BY 1, 2, 3
        HAVING sum(n) <> 0;
    END IF;
    IF FOUND AND current_setting('crm_pipeline.apply_queued', true) IS DISTINCT FROM 'on' THEN
        INSERT INTO pipeline_apply_queue (queued) VALUES (true) RETURNING ctid INTO v_queue;
        DELETE FROM pipeline_apply_queue WHERE ctid = v_queue;
        v_setting := set_config('crm_pipeline.apply_queued', 'on', true);
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION pipeline_track_quotes() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_live text[];
    v_skipped text[];
    v_queue tid;
    v_setting text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT coalesce(array_agg(id) FILTER (WHERE status <> 'deprovisioning'), '{}'),
               coalesce(array_agg(id) FILTER (WHERE status = 'deprovisioning'), '{}')
        INTO v_live, v_skipped
        FROM tenants WHERE id = ANY (ARRAY(SELECT DISTINCT tenant_id FROM new_rows));
    ELSIF TG_OP = 'DELETE' THEN
        SELECT coalesce(array_agg(id) FILTER (WHERE status <> 'deprovisioning'), '{}'),
               coalesce(array_agg(id) FILTER (WHERE status = 'deprovisioning'), '{}')
        INTO v_live, v_skipped
        FROM tenants WHERE id = ANY (ARRAY(SELECT DISTINCT tenant_id FROM old_rows));
    ELSE
        SELECT coalesce(array_agg(id) FILTER (WHERE status <> 'deprovisioning'), '{}'),
               coalesce(array_agg(id) FILTER (WHERE status = 'deprovisioning'), '{}')
        INTO v_live, v_skipped
        FROM tenants
        WHERE id = ANY (ARRAY(SELECT tenant_id FROM new_rows UNION SELECT tenant_id FROM old_rows));
    END IF;
    IF cardinality(v_skipped) > 0 THEN
        PERFORM pg_advisory_xact_lock_shared(pipeline_lock_space(), pipeline_tenant_lock_key(t))
        FROM unnest(v_skipped) t;
    END IF;
    IF cardinality(v_live) = 0 THEN
        RETURN NULL;
    END IF;
    IF to_regclass('pg_temp.pipeline_pending') IS NULL THEN
        PERFORM pipeline_pending_open();
    END IF;

    -- Only priced quotes with a usable email can ever count.
    IF TG_OP = 'INSERT' THEN
        INSERT INTO pg_temp.pipeline_pending (tenant, email_key, currency, amount, priced_quotes)
        SELECT tenant_id, pipeline_email_key(customer_email), currency, sum(total_price), count(*)
        FROM new_rows
        WHERE tenant_id = ANY (v_live)
          AND total_price IS NOT NULL AND pipeline_email_key(customer_email) IS NOT NULL
        GROUP BY 1, 2, 3;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO pg_temp.pipeline_pending (tenant, email_key, currency, amount, priced_quotes)
        SELECT tenant_id, pipeline_email_key(customer_email), currency, -sum(total_price), -count(*)
        FROM old_rows
        WHERE tenant_id = ANY (v_live)
          AND total_price IS NOT NULL AND pipeline_email_key(customer_email) IS NOT NULL
        GROUP BY 1, 2, 3;
    ELSE
        INSERT INTO pg_temp.pipeline_pending (tenant, email_key, currency, amount, priced_quotes)
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
        WHERE tenant_id = ANY (v_live) AND email_key IS NOT NULL
        GROUP BY 1, 2, 3
        HAVING sum(n) <> 0 OR sum(amount) <> 0;
    END IF;
    IF FOUND AND current_setting('crm_pipeline.apply_queued', true) IS DISTINCT FROM 'on' THEN
        INSERT INTO pipeline_apply_queue (queued) VALUES (true) RETURNING ctid INTO v_queue;
        DELETE FROM pipeline_apply_queue WHERE ctid = v_queue;
        v_setting := set_config('crm_pipeline.apply_queued', 'on', true);
    END IF;
    RETURN NULL;
END
$$;

-- Transition tables need one trigger per event (and no column list).
CREATE TRIGGER pipeline_track_insert AFTER INSERT ON clients
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline_track_clients();
CREATE TRIGGER pipeline_track_update AFTER UPDATE ON clients
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline_track_clients();
CREATE TRIGGER pipeline_track_delete AFTER DELETE ON clients
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline_track_clients();

CREATE TRIGGER pipeline_track_insert AFTER INSERT ON quotes
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline_track_quotes();
CREATE TRIGGER pipeline_track_update AFTER UPDATE ON quotes
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline_track_quotes();
CREATE TRIGGER pipeline_track_delete AFTER DELETE ON quotes
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline_track_quotes();


-- 2. At commit: apply the transaction's deltas, taking locks in one fixed
-- order: tenant locks (shared, by key), emails, stage values, stage clients,
-- each by key (a sorted INSERT ... ON CONFLICT locks its rows in that order;
-- the email clients and quotes rows in between are covered by the email locks).
-- Each step is its own statement: under READ COMMITTED each one sees what the
-- transactions it waited for committed. Rows only reach zero through a
-- negative delta: only then are they deleted.
-- enable_seqscan off: the deltas touch a few keys of large aggregate tables.
-- Left alone, the planner hash-joins a few hundred deltas against a full scan
-- of a table of tens of thousands of rows (half the commit time of a 100-row
-- statement); index probes stay right for any number of deltas. The temporary
-- table has no index and is scanned regardless.
-- force_generic_plan (here and in the statement triggers): the statements that
-- take a tenant array as a parameter were otherwise planned again at every
-- call, although one plan suits every call.

CREATE FUNCTION pipeline_apply_pending() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_tenants text[];
    v_live text[];
    v_rows bigint;
    v_clients boolean;
    v_emails boolean;
    v_quotes boolean;
    v_negative boolean;
    v_size text;
    v_setting text;
BEGIN
    -- A statement after an early apply (SET CONSTRAINTS ... IMMEDIATE) queues another.
    v_setting := set_config('crm_pipeline.apply_queued', 'off', true);

    SELECT coalesce(array_agg(DISTINCT tenant), '{}'), count(*),
           coalesce(bool_or(stage IS NOT NULL), false),
           coalesce(bool_or(email_key IS NOT NULL), false),
           coalesce(bool_or(currency IS NOT NULL), false),
           coalesce(bool_or(clients < 0 OR priced_quotes < 0), false)
    INTO v_tenants, v_rows, v_clients, v_emails, v_quotes, v_negative
    FROM pg_temp.pipeline_pending;
    IF v_rows = 0 THEN
        RETURN NULL;
    END IF;

    PERFORM pg_advisory_xact_lock_shared(pipeline_lock_space(), k)
    FROM (SELECT DISTINCT pipeline_tenant_lock_key(t) AS k FROM unnest(v_tenants) t ORDER BY 1) keys;
    -- A new statement: it sees a status change that committed while we waited.
    -- No maintenance for tenants being deprovisioned (or already gone).
    v_live := ARRAY(SELECT id FROM tenants WHERE id = ANY (v_tenants) AND status <> 'deprovisioning');
    IF cardinality(v_live) < cardinality(v_tenants) THEN
        DELETE FROM pg_temp.pipeline_pending WHERE tenant <> ALL (v_live);
        IF cardinality(v_live) = 0 THEN
            RETURN NULL;
        END IF;
    END IF;

    -- The statements below are planned once per session and cached. A plan
    -- made for a few deltas (index lookups) is hopeless for a bulk statement's
    -- hundred thousand and the other way round: when the size class changes,
    -- ANALYZE the deltas, which also invalidates the cached plans.
    v_size := CASE WHEN v_rows > 1000 THEN 'bulk' ELSE 'small' END;
    IF v_size IS DISTINCT FROM current_setting('crm_pipeline.planned_for', true) THEN
        ANALYZE pg_temp.pipeline_pending;
        v_setting := set_config('crm_pipeline.planned_for', v_size, false);
    END IF;

    IF v_emails THEN
        -- Emails: the lock that orders every change to n(e, .) and q(e, .).
        INSERT INTO pipeline_emails AS e (tenant_id, email_key, clients, priced_quotes)
        SELECT tenant, email_key, sum(clients), sum(priced_quotes)
        FROM pg_temp.pipeline_pending
        WHERE email_key IS NOT NULL
        GROUP BY 1, 2
        ORDER BY 1, 2
        ON CONFLICT (tenant_id, email_key) DO UPDATE
            SET clients = e.clients + excluded.clients,
                priced_quotes = e.priced_quotes + excluded.priced_quotes;

        -- Stage values. Per email, n'q' - nq = dn * q + n * dq + dn * dq with
        -- n, q as committed (read now, before they are updated below) and
        -- dn, dq this transaction's deltas; the same with k for matches.
        INSERT INTO pipeline_stage_values AS v (tenant_id, stage, currency, amount, matches)
        SELECT tenant_id, stage, currency, sum(amount), sum(matches)
        FROM (
            SELECT d.tenant AS tenant_id, d.stage, q.currency,
                   d.clients * q.amount AS amount, d.clients * q.priced_quotes AS matches
            FROM pg_temp.pipeline_pending d
            JOIN pipeline_email_quotes q ON q.tenant_id = d.tenant AND q.email_key = d.email_key
            WHERE d.stage IS NOT NULL
            UNION ALL
            SELECT d.tenant, c.stage, d.currency, c.clients * d.amount, c.clients * d.priced_quotes
            FROM pg_temp.pipeline_pending d
            JOIN pipeline_email_clients c ON c.tenant_id = d.tenant AND c.email_key = d.email_key
            WHERE d.currency IS NOT NULL
            UNION ALL
            SELECT dc.tenant, dc.stage, dq.currency, dc.clients * dq.amount, dc.clients * dq.priced_quotes
            FROM pg_temp.pipeline_pending dc
            JOIN pg_temp.pipeline_pending dq ON dq.tenant = dc.tenant AND dq.email_key = dc.email_key
            WHERE dc.stage IS NOT NULL AND dq.currency IS NOT NULL
        ) changes
        GROUP BY 1, 2, 3
        HAVING sum(matches) <> 0 OR sum(amount) <> 0
        ORDER BY 1, 2, 3
        ON CONFLICT (tenant_id, stage, currency) DO UPDATE
            SET amount = v.amount + excluded.amount,
                matches = v.matches + excluded.matches;

        -- n(e, s) and q(e, c), k(e, c): MERGE inserts, updates or deletes (at
        -- zero) in one statement. It cannot meet a concurrent insert of the same
        -- key (it has no ON CONFLICT): these rows change only under their email's
        -- lock, held since the first statement above.
        IF v_clients THEN
            MERGE INTO pipeline_email_clients AS c
            USING (
                SELECT tenant, email_key, stage, sum(clients) AS clients
                FROM pg_temp.pipeline_pending
                WHERE stage IS NOT NULL AND email_key IS NOT NULL
                GROUP BY 1, 2, 3
                HAVING sum(clients) <> 0
            ) AS d
            ON c.tenant_id = d.tenant AND c.email_key = d.email_key AND c.stage = d.stage
            WHEN MATCHED AND c.clients + d.clients = 0 THEN DELETE
            WHEN MATCHED THEN UPDATE SET clients = c.clients + d.clients
            WHEN NOT MATCHED THEN
                INSERT (tenant_id, email_key, stage, clients)
                VALUES (d.tenant, d.email_key, d.stage, d.clients);
        END IF;

        IF v_quotes THEN
            MERGE INTO pipeline_email_quotes AS q
            USING (
                SELECT tenant, email_key, currency,
                       sum(amount) AS amount, sum(priced_quotes) AS priced_quotes
                FROM pg_temp.pipeline_pending
                WHERE currency IS NOT NULL
                GROUP BY 1, 2, 3
                HAVING sum(priced_quotes) <> 0 OR sum(amount) <> 0
            ) AS d
            ON q.tenant_id = d.tenant AND q.email_key = d.email_key AND q.currency = d.currency
            WHEN MATCHED AND q.priced_quotes + d.priced_quotes = 0 THEN DELETE
            WHEN MATCHED THEN
                UPDATE SET amount = q.amount + d.amount,
                           priced_quotes = q.priced_quotes + d.priced_quotes
            WHEN NOT MATCHED THEN
                INSERT (tenant_id, email_key, currency, amount, priced_quotes)
                VALUES (d.tenant, d.email_key, d.currency, d.amount, d.priced_quotes);
        END IF;

        IF v_negative THEN
            -- Only rows this transaction updated can be at zero.
            DELETE FROM pipeline_stage_values v
            WHERE v.matches = 0 AND v.tenant_id = ANY (v_live);
            DELETE FROM pipeline_emails e
            USING pg_temp.pipeline_pending d
            WHERE e.clients = 0 AND e.priced_quotes = 0
              AND e.tenant_id = d.tenant AND e.email_key = d.email_key;
        END IF;
    END IF;

    IF v_clients THEN
        -- Clients per stage, NULL emails included.
        INSERT INTO pipeline_stage_clients AS s (tenant_id, stage, clients)
        SELECT tenant, stage, sum(clients)
        FROM pg_temp.pipeline_pending
        WHERE stage IS NOT NULL
        GROUP BY 1, 2
        HAVING sum(clients) <> 0
        ORDER BY 1, 2
        ON CONFLICT (tenant_id, stage) DO UPDATE
            SET clients = s.clients + excluded.clients;
        IF v_negative THEN
            DELETE FROM pipeline_stage_clients s
            WHERE s.clients = 0 AND s.tenant_id = ANY (v_live);
        END IF;
    END IF;

    -- Applied. Truncating costs a new file: only once dead rows have grown the
    -- table (and the plans above then need fresh statistics).
    IF pg_relation_size('pg_temp.pipeline_pending') > 65536 THEN
        TRUNCATE pg_temp.pipeline_pending;
        v_setting := set_config('crm_pipeline.planned_for', '', false);
    ELSE
        DELETE FROM pg_temp.pipeline_pending;
    END IF;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER pipeline_apply_at_commit AFTER INSERT ON pipeline_apply_queue
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION pipeline_apply_pending();


-- 3. What the aggregates of some tenants should hold, recomputed from clients
-- and quotes (their stored email_key, read in index order; 0002): used by the
-- rebuild and by the verification. No SET clause and
-- qualified names, so that the planner inlines them and plans with the real
-- tables' statistics (a function scan is estimated at 1000 rows whatever it
-- returns, and joining two such estimates of a million rows goes quadratic).

CREATE FUNCTION pipeline_expected_email_clients(p_tenants text[])
RETURNS TABLE (tenant_id text, email_key text, stage text, clients bigint)
LANGUAGE sql STABLE
AS $$
    SELECT c.tenant_id, c.email_key, c.pipeline_stage, count(*)
    FROM public.clients c
    WHERE c.tenant_id = ANY (p_tenants) AND c.email_key IS NOT NULL
    GROUP BY 1, 2, 3
$$;

CREATE FUNCTION pipeline_expected_email_quotes(p_tenants text[])
RETURNS TABLE (tenant_id text, email_key text, currency char(3), amount numeric, priced_quotes bigint)
LANGUAGE sql STABLE
AS $$
    SELECT q.tenant_id, q.email_key, q.currency, sum(q.total_price), count(*)
    FROM public.quotes q
    WHERE q.tenant_id = ANY (p_tenants) AND q.total_price IS NOT NULL AND q.email_key IS NOT NULL
    GROUP BY 1, 2, 3
$$;

CREATE FUNCTION pipeline_expected_stage_clients(p_tenants text[])
RETURNS TABLE (tenant_id text, stage text, clients bigint)
LANGUAGE sql STABLE
AS $$
    SELECT c.tenant_id, c.pipeline_stage, count(*)
    FROM public.clients c
    WHERE c.tenant_id = ANY (p_tenants)
    GROUP BY 1, 2
$$;


-- 4. Rebuild the aggregates of one tenant (or of all with NULL) from scratch,
-- online. One tenant: its lock is held exclusively, so commits that would
-- apply deltas for it wait and then apply them on top of the rebuilt rows,
-- while what committed before is part of the rebuild; other tenants are not
-- disturbed. All tenants: clients and quotes are locked against writes
-- instead (one advisory lock per tenant could exhaust the lock table).
-- Tenants being deprovisioned are only emptied. Returns the number of tenants
-- rebuilt. Used by the backfill below, by operators (`python -m crm_svc verify
-- --repair`), after TRUNCATE and when a tenant leaves 'deprovisioning'.
-- Run it under READ COMMITTED (the default).

CREATE FUNCTION pipeline_aggregates_rebuild(p_tenant_id text DEFAULT NULL) RETURNS integer
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    v_all text[];
    v_live text[];
BEGIN
    IF p_tenant_id IS NULL THEN
        LOCK TABLE clients, quotes IN SHARE ROW EXCLUSIVE MODE;
    ELSE
        PERFORM pg_advisory_xact_lock(pipeline_lock_space(), pipeline_tenant_lock_key(p_tenant_id));
    END IF;
    -- New statements from here on: they see what the writers we waited for committed.
    v_all := ARRAY(SELECT id FROM tenants WHERE p_tenant_id IS NULL OR id = p_tenant_id);
    v_live := ARRAY(SELECT id FROM tenants WHERE id = ANY (v_all) AND status <> 'deprovisioning');

    -- This transaction's own changes so far are part of what is recomputed.
    IF to_regclass('pg_temp.pipeline_pending') IS NOT NULL THEN
        DELETE FROM pg_temp.pipeline_pending WHERE tenant = ANY (v_all);
    END IF;

    DELETE FROM pipeline_stage_values WHERE tenant_id = ANY (v_all);
    DELETE FROM pipeline_stage_clients WHERE tenant_id = ANY (v_all);
    DELETE FROM pipeline_email_clients WHERE tenant_id = ANY (v_all);
    DELETE FROM pipeline_email_quotes WHERE tenant_id = ANY (v_all);
    DELETE FROM pipeline_emails WHERE tenant_id = ANY (v_all);

    INSERT INTO pipeline_email_clients (tenant_id, email_key, stage, clients)
    SELECT * FROM pipeline_expected_email_clients(v_live);
    INSERT INTO pipeline_email_quotes (tenant_id, email_key, currency, amount, priced_quotes)
    SELECT * FROM pipeline_expected_email_quotes(v_live);
    INSERT INTO pipeline_stage_clients (tenant_id, stage, clients)
    SELECT * FROM pipeline_expected_stage_clients(v_live);

    INSERT INTO pipeline_emails (tenant_id, email_key, clients, priced_quotes)
    SELECT tenant_id, email_key, coalesce(c.clients, 0), coalesce(q.priced_quotes, 0)
    FROM (SELECT tenant_id, email_key, sum(clients) AS clients
          FROM pipeline_email_clients WHERE tenant_id = ANY (v_live) GROUP BY 1, 2) c
    FULL JOIN (SELECT tenant_id, email_key, sum(priced_quotes) AS priced_quotes
               FROM pipeline_email_quotes WHERE tenant_id = ANY (v_live) GROUP BY 1, 2) q
        USING (tenant_id, email_key);

    INSERT INTO pipeline_stage_values (tenant_id, stage, currency, amount, matches)
    SELECT c.tenant_id, c.stage, q.currency, sum(c.clients * q.amount), sum(c.clients * q.priced_quotes)
    FROM pipeline_email_clients c
    JOIN pipeline_email_quotes q USING (tenant_id, email_key)
    WHERE c.tenant_id = ANY (v_live)
    GROUP BY 1, 2, 3;

    RETURN cardinality(v_live);
END
$$;

-- TRUNCATE fires no row or statement triggers of the kinds above: rebuild.
CREATE FUNCTION pipeline_rebuild_after_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM pipeline_aggregates_rebuild(NULL);
    RETURN NULL;
END
$$;
CREATE TRIGGER pipeline_rebuild_after_truncate AFTER TRUNCATE ON clients
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline_rebuild_after_truncate();
CREATE TRIGGER pipeline_rebuild_after_truncate AFTER TRUNCATE ON quotes
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline_rebuild_after_truncate();

-- A status change waits for the commits applying deltas for the tenant and
-- holds back new ones until it commits, which then see the new status.
-- Nothing was maintained while the tenant was being deprovisioned: if it
-- becomes active again, its aggregates are rebuilt.
CREATE FUNCTION pipeline_tenant_status_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(pipeline_lock_space(), pipeline_tenant_lock_key(NEW.id));
    IF OLD.status = 'deprovisioning' AND NEW.status <> 'deprovisioning' THEN
        PERFORM pipeline_aggregates_rebuild(NEW.id);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER pipeline_tenant_status_changed AFTER UPDATE OF status ON tenants
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION pipeline_tenant_status_changed();


-- 5. The summaries. pipeline_summary keeps its contract but reads the
-- aggregates; the full scan of 0002 stays as pipeline_summary_recompute.

-- The full scan is 0002's function itself, renamed (its grants go with it);
-- the new pipeline_summary below gets the default privileges of 0005. No
-- nested loops: for a tenant loaded since the last ANALYZE the planner would
-- join its clients and quote sums with one and take minutes instead of seconds
-- (pipeline_verify calls this).
ALTER FUNCTION pipeline_summary(text) RENAME TO pipeline_summary_recompute;
ALTER FUNCTION pipeline_summary_recompute(text) SET enable_nestloop = off;

CREATE FUNCTION pipeline_summary(p_tenant_id text) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = public, pg_temp
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

    -- At most 6 + 6 x currencies rows, whatever the tenant's size.
    WITH stage_counts AS (
        SELECT stage, clients AS client_count
        FROM pipeline_stage_clients
        WHERE tenant_id = p_tenant_id
    ),
    stage_values AS (
        SELECT stage, currency, amount
        FROM pipeline_stage_values
        WHERE tenant_id = p_tenant_id
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


-- 6. Verification for operators (python -m crm_svc verify): the tenants, and
-- for one tenant the aggregate-backed summary next to the full scan plus, per
-- aggregate table, how many rows differ from a recomputation (drift there is
-- not always visible in the summary yet). STABLE: everything is read in one
-- snapshot, so concurrent writes never show up as drift.

CREATE FUNCTION pipeline_verify_tenants() RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = public, pg_temp
AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object('tenant_id', id, 'status', status) ORDER BY id),
                    '[]'::jsonb)
    FROM tenants
$$;

-- It reads whole tenants: a nested loop never helps, and when statistics do
-- not know a tenant yet (loaded since the last ANALYZE) the planner would pick
-- one between two large aggregates, which goes quadratic.
CREATE FUNCTION pipeline_verify(p_tenant_id text) RETURNS jsonb
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

    SELECT jsonb_build_object(
        'pipeline_email_clients', (
            SELECT count(*)
            FROM (SELECT * FROM pipeline_email_clients WHERE tenant_id = p_tenant_id) a
            FULL JOIN pipeline_expected_email_clients(v_tenants) e USING (email_key, stage)
            WHERE a.clients IS DISTINCT FROM e.clients),
        'pipeline_email_quotes', (
            SELECT count(*)
            FROM (SELECT * FROM pipeline_email_quotes WHERE tenant_id = p_tenant_id) a
            FULL JOIN pipeline_expected_email_quotes(v_tenants) e USING (email_key, currency)
            WHERE a.amount IS DISTINCT FROM e.amount
               OR a.priced_quotes IS DISTINCT FROM e.priced_quotes),
        'pipeline_emails', (
            SELECT count(*)
            FROM (SELECT * FROM pipeline_emails WHERE tenant_id = p_tenant_id) a
            FULL JOIN (
                SELECT email_key, coalesce(c.clients, 0) AS clients,
                       coalesce(q.priced_quotes, 0) AS priced_quotes
                FROM (SELECT email_key, sum(clients) AS clients
                      FROM pipeline_expected_email_clients(v_tenants) GROUP BY 1) c
                FULL JOIN (SELECT email_key, sum(priced_quotes) AS priced_quotes
                           FROM pipeline_expected_email_quotes(v_tenants) GROUP BY 1) q
                    USING (email_key)
            ) e USING (email_key)
            WHERE a.clients IS DISTINCT FROM e.clients
               OR a.priced_quotes IS DISTINCT FROM e.priced_quotes),
        'pipeline_stage_clients', (
            SELECT count(*)
            FROM (SELECT * FROM pipeline_stage_clients WHERE tenant_id = p_tenant_id) a
            FULL JOIN pipeline_expected_stage_clients(v_tenants) e USING (stage)
            WHERE a.clients IS DISTINCT FROM e.clients),
        'pipeline_stage_values', (
            SELECT count(*)
            FROM (SELECT * FROM pipeline_stage_values WHERE tenant_id = p_tenant_id) a
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
        'mismatched_rows', v_rows);
END
$$;


-- 7. Backfill (under the lock taken at the top). DO: yoyo prints a SELECT's rows.
DO $$ BEGIN PERFORM pipeline_aggregates_rebuild(NULL); END $$;

-- 8. As for every table (0005): row-level security with no policy, so only the
-- backend role (which bypasses it) and the owner see aggregate rows.
ALTER TABLE pipeline_emails ENABLE ROW LEVEL SECURITY;
ALTER TABLE pipeline_email_clients ENABLE ROW LEVEL SECURITY;
ALTER TABLE pipeline_email_quotes ENABLE ROW LEVEL SECURITY;
ALTER TABLE pipeline_stage_clients ENABLE ROW LEVEL SECURITY;
ALTER TABLE pipeline_stage_values ENABLE ROW LEVEL SECURITY;
ALTER TABLE pipeline_apply_queue ENABLE ROW LEVEL SECURITY;
