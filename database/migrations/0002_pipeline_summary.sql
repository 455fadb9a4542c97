-- The pipeline summary: per tenant and pipeline stage, how many clients and
-- what their quotes are worth, exact to the cent at any tenant size and at
-- any compaction lag. docs/pipeline.md explains the design; this file is the
-- whole of it, in order:
--
--   0. the email key, stored on clients and quotes and indexed
--   1. the aggregates: clients per stage, value per stage and currency
--   2. the delta log that writers append to, and their triggers
--   3. reading: aggregates + pending deltas, or a full recomputation
--   4. compaction (fold deltas in) and rebuild (recompute a tenant)
--   5. the summary document, and the functions the RPC and operators call
--   6. TRUNCATE, tenant status changes
--
-- Semantics: a client's value is the sum of the priced quotes whose email key
-- equals the client's; a quote counts for every client with its key. NULL,
-- empty and all-whitespace emails match nothing (their clients still count).
-- A stage shows a currency iff some (client, priced quote) pair matches in it,
-- so a 0.00 sum of real prices is shown and all-NULL prices are not.
--
-- Why it looks like this (the history, so the code need not keep it):
--   * A full scan per summary (sorting on the normalised email) took 9 s at
--     1M clients. Storing the key and reading it in index order brought that
--     to under 2 s: that scan is pipeline_summary_recompute.
--   * Aggregates applied at each writer's commit made a one-row write three
--     times slower: writers now append deltas and a background compactor folds
--     them in, so a write takes no lock on any aggregate row.
--   * Per-email aggregate tables (clients per email and stage, quote sums per
--     email and currency) made every fold an upsert into tables as large as the
--     tenant, and a rebuild of a 1M-client tenant take half a minute. The
--     per-email values are read from the base tables' key indexes instead, so
--     the only aggregates are a few rows per stage.
--   * A bulk import of a million rows left a backlog that took minutes to fold
--     while every summary of that tenant timed out. A statement that changes
--     more rows of a tenant than are worth folding now marks the tenant for a
--     rebuild instead of logging deltas, a summary recomputes whenever that is
--     cheaper than folding, and the compactor rebuilds such tenants.
--
-- Domain errors are signalled with a SQLSTATE and a HINT that is the
-- ErrorInfo reason (shared/database/errors.py maps them).


-- 0. The email key -------------------------------------------------------------

-- The key that matches a client to its quotes: the email as the system we
-- replace normalised it, Python's `email.strip().lower()`. strip() removes
-- every character for which str.isspace() is true (tab, LF, VT, FF, CR, the
-- information separators 0x1C-0x1F, space, NEL, NBSP, U+1680, U+2000-U+200A,
-- U+2028, U+2029, U+202F, U+205F, U+3000), not only spaces. NULL, empty and
-- all-whitespace emails get no key.
CREATE FUNCTION pipeline_email_key(p_email text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN NULLIF(lower(btrim(p_email,
    E'\t\n\u000B\f\r\u001C\u001D\u001E\u001F \u0085\u00A0\u1680'
    || E'\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200A'
    || E'\u2028\u2029\u202F\u205F\u3000')), '');

-- Stored and indexed: the full scan reads it in key order, and folding looks
-- up one key's clients and quotes here. Stored values follow the function as
-- it was when they were written: a new definition of pipeline_email_key needs
-- these columns rewritten too.
ALTER TABLE clients
    ADD COLUMN email_key text GENERATED ALWAYS AS (pipeline_email_key(email)) STORED;
ALTER TABLE quotes
    ADD COLUMN email_key text GENERATED ALWAYS AS (pipeline_email_key(customer_email)) STORED;
CREATE INDEX clients_email_key_idx ON clients (tenant_id, email_key, pipeline_stage);
CREATE INDEX quotes_email_key_idx ON quotes (tenant_id, email_key, currency) INCLUDE (total_price);


-- 1. The aggregates --------------------------------------------------------------

-- Every summary reads these and every compaction updates them: a low
-- fillfactor keeps the updates HOT. Amounts have scale 2 like the prices, so
-- they print exactly as sum() over numeric(14, 2) does.
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


-- 2. The delta log ---------------------------------------------------------------

-- What committed writes changed and the aggregates do not hold yet. A delta
-- commits or rolls back with the rows it describes, so in any snapshot
-- "aggregates + visible deltas" is the state of clients and quotes.
-- A row with neither stage nor currency is a rebuild mark: a statement
-- changed too many of the tenant's rows to log them one by one, so the
-- tenant's aggregates are only good after a rebuild (section 4).
-- No foreign key to tenants: a delta is written only with rows that passed
-- their own. Keyed by email key ('' for clients without one, and for marks),
-- so a compaction batch is a key range. Ids come from a cached sequence: a
-- bulk statement would otherwise spend half its logging cost in nextval.
-- Emptied as fast as it fills: vacuum it early, and never truncate it (that
-- takes a lock every writer and reader of the log would queue behind, and
-- the pages are soon needed again).
CREATE TABLE pipeline_deltas (
    tenant_id     text NOT NULL,
    email_key     text NOT NULL DEFAULT '',
    id            bigint GENERATED ALWAYS AS IDENTITY (CACHE 1000),
    stage         text,            -- set on client deltas
    currency      char(3),         -- set on quote deltas
    clients       bigint NOT NULL DEFAULT 0,
    amount        numeric(38, 2) NOT NULL DEFAULT 0,
    priced_quotes bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, email_key, id),
    CHECK (stage IS NULL OR currency IS NULL),
    CHECK (currency IS NULL OR email_key <> '')
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 2000,
        vacuum_truncate = false);

-- How many of a tenant's deltas are worth folding: beyond this many, reading
-- the tenant through a full recomputation (and rebuilding it) costs less than
-- folding them. Folding a delta is two index probes: about ten times what the
-- scan spends per client with a warm cache, fifty times and more while a bulk
-- load keeps the cache cold and the visibility map unset (a fold of a tenth
-- of a 1M-client tenant then took over 10 s). Hence a fiftieth. The floor keeps small statements on small tenants logging
-- deltas (a rebuild of a small tenant is cheap, but a mark sends every read of
-- it through the scan until then); it is the setting
-- crm_pipeline.min_fold_limit (default 1000), so that tests can reach the bulk
-- paths with a few rows.
CREATE FUNCTION pipeline_min_fold_limit() RETURNS bigint
LANGUAGE sql STABLE
RETURN coalesce(nullif(current_setting('crm_pipeline.min_fold_limit', true), '')::bigint, 1000);

CREATE FUNCTION pipeline_fold_limit(p_tenant_id text) RETURNS bigint
LANGUAGE sql STABLE
RETURN greatest(
    public.pipeline_min_fold_limit(),
    (SELECT coalesce(sum(s.clients), 0) / 50
     FROM public.pipeline_stage_clients s WHERE s.tenant_id = p_tenant_id));

-- True when the tenant's aggregates plus its visible deltas are not the
-- cheapest exact answer: a rebuild mark, or more deltas than are worth
-- folding. Reads at most pipeline_fold_limit + 1 index entries.
CREATE FUNCTION pipeline_needs_recompute(p_tenant_id text) RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = public, pg_temp
AS $$
DECLARE
    v_limit bigint := pipeline_fold_limit(p_tenant_id);
BEGIN
    RETURN EXISTS (
               SELECT 1 FROM pipeline_deltas
               WHERE tenant_id = p_tenant_id AND email_key = ''
                 AND stage IS NULL AND currency IS NULL)
        OR (SELECT count(*) FROM (
               SELECT 1 FROM pipeline_deltas WHERE tenant_id = p_tenant_id LIMIT v_limit + 1) d
           ) > v_limit;
END
$$;


-- Tenant locks (advisory: nothing is written for them, unlike a row lock on
-- the busy tenants row). Compaction and rebuilds of a tenant hold its lock
-- exclusively, so they never overlap; so does a status change, so that it
-- waits for them and they see the new status. A delete that finds the tenant
-- being deprovisioned holds it shared (see pipeline_unmaintained).
CREATE FUNCTION pipeline_lock_space() RETURNS integer   -- ASCII 'pipe'
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 1885958245;

CREATE FUNCTION pipeline_tenant_lock_key(p_tenant_id text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN hashtext(p_tenant_id);

-- Of these tenants, those being deprovisioned: nothing is maintained for them,
-- so deleting their rows logs nothing and deprovisioning costs no delta work.
-- Their locks are then held shared and the status read again: a concurrent
-- change back to 'active' rebuilds under the lock held exclusively, so it
-- either sees these deletes or makes us see the new status.
CREATE FUNCTION pipeline_unmaintained(p_tenants text[]) RETURNS text[]
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    v_tenants text[];
BEGIN
    v_tenants := ARRAY(SELECT id FROM tenants WHERE id = ANY (p_tenants) AND status = 'deprovisioning');
    IF cardinality(v_tenants) = 0 THEN
        RETURN v_tenants;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(pipeline_lock_space(), k)
    FROM (SELECT DISTINCT pipeline_tenant_lock_key(t) AS k FROM unnest(v_tenants) t ORDER BY 1) keys;
    RETURN ARRAY(SELECT id FROM tenants WHERE id = ANY (v_tenants) AND status = 'deprovisioning');
END
$$;

-- Of the tenants of a statement's rows (one entry per row), those with more
-- rows in it than pipeline_fold_limit get a rebuild mark. Returns them.
CREATE FUNCTION pipeline_mark_bulk(p_row_tenants text[]) RETURNS text[]
LANGUAGE sql
SET search_path = public, pg_temp
AS $$
    WITH marked AS (
        INSERT INTO pipeline_deltas (tenant_id)
        SELECT t FROM unnest(p_row_tenants) t
        GROUP BY 1 HAVING count(*) > pipeline_fold_limit(t)
        RETURNING tenant_id
    )
    SELECT coalesce(array_agg(tenant_id), '{}') FROM marked
$$;

-- The writers' triggers: each statement's transition table becomes deltas in
-- one INSERT, a delta per row (grouping them here cost a single-row write a
-- fifth of its throughput; compaction groups them anyway). UPDATE counts the
-- old rows out and the new rows in, grouped by key, so rows whose key and
-- stage (or price and currency) did not change log nothing. A tenant with
-- more rows in the statement than pipeline_fold_limit gets one rebuild mark
-- instead; the check costs a single-row write one bounded count.
CREATE FUNCTION pipeline_track_clients() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_floor bigint := pipeline_min_fold_limit();
    v_skip text[] := '{}';  -- tenants not maintained, or marked for a rebuild
BEGIN
    -- A trigger has only the transition tables of its own event.
    IF TG_OP = 'DELETE' THEN
        v_skip := pipeline_unmaintained(ARRAY(SELECT DISTINCT tenant_id FROM old_rows));
        IF (SELECT count(*) FROM (SELECT FROM old_rows LIMIT v_floor) r) >= v_floor THEN
            v_skip := v_skip || pipeline_mark_bulk(
                ARRAY(SELECT tenant_id FROM old_rows WHERE tenant_id <> ALL (v_skip)));
        END IF;
        INSERT INTO pipeline_deltas (tenant_id, email_key, stage, clients)
        SELECT tenant_id, coalesce(email_key, ''), pipeline_stage, -1
        FROM old_rows WHERE tenant_id <> ALL (v_skip);
        RETURN NULL;
    END IF;

    IF (SELECT count(*) FROM (SELECT FROM new_rows LIMIT v_floor) r) >= v_floor THEN
        v_skip := pipeline_mark_bulk(ARRAY(SELECT tenant_id FROM new_rows));
    END IF;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO pipeline_deltas (tenant_id, email_key, stage, clients)
        SELECT tenant_id, coalesce(email_key, ''), pipeline_stage, 1
        FROM new_rows WHERE tenant_id <> ALL (v_skip);
    ELSE
        INSERT INTO pipeline_deltas (tenant_id, email_key, stage, clients)
        SELECT tenant_id, email_key, stage, sum(n)
        FROM (
            SELECT tenant_id, coalesce(email_key, '') AS email_key, pipeline_stage AS stage, 1 AS n
            FROM new_rows
            UNION ALL
            SELECT tenant_id, coalesce(email_key, ''), pipeline_stage, -1
            FROM old_rows
        ) moved
        WHERE tenant_id <> ALL (v_skip)
        GROUP BY 1, 2, 3
        HAVING sum(n) <> 0;
    END IF;
    RETURN NULL;
END
$$;

-- Only priced quotes with a key can ever count.
CREATE FUNCTION pipeline_track_quotes() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_floor bigint := pipeline_min_fold_limit();
    v_skip text[] := '{}';
BEGIN
    IF TG_OP = 'DELETE' THEN
        v_skip := pipeline_unmaintained(ARRAY(SELECT DISTINCT tenant_id FROM old_rows));
        IF (SELECT count(*) FROM (SELECT FROM old_rows LIMIT v_floor) r) >= v_floor THEN
            v_skip := v_skip || pipeline_mark_bulk(
                ARRAY(SELECT tenant_id FROM old_rows WHERE tenant_id <> ALL (v_skip)));
        END IF;
        INSERT INTO pipeline_deltas (tenant_id, email_key, currency, amount, priced_quotes)
        SELECT tenant_id, email_key, currency, -total_price, -1
        FROM old_rows
        WHERE tenant_id <> ALL (v_skip) AND total_price IS NOT NULL AND email_key IS NOT NULL;
        RETURN NULL;
    END IF;

    IF (SELECT count(*) FROM (SELECT FROM new_rows LIMIT v_floor) r) >= v_floor THEN
        v_skip := pipeline_mark_bulk(ARRAY(SELECT tenant_id FROM new_rows));
    END IF;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO pipeline_deltas (tenant_id, email_key, currency, amount, priced_quotes)
        SELECT tenant_id, email_key, currency, total_price, 1
        FROM new_rows
        WHERE tenant_id <> ALL (v_skip) AND total_price IS NOT NULL AND email_key IS NOT NULL;
    ELSE
        INSERT INTO pipeline_deltas (tenant_id, email_key, currency, amount, priced_quotes)
        SELECT tenant_id, email_key, currency, sum(amount), sum(n)
        FROM (
            SELECT tenant_id, email_key, currency, total_price AS amount, 1 AS n
            FROM new_rows
            WHERE total_price IS NOT NULL AND email_key IS NOT NULL
            UNION ALL
            SELECT tenant_id, email_key, currency, -total_price, -1
            FROM old_rows
            WHERE total_price IS NOT NULL AND email_key IS NOT NULL
        ) moved
        WHERE tenant_id <> ALL (v_skip)
        GROUP BY 1, 2, 3
        HAVING sum(n) <> 0 OR sum(amount) <> 0;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER pipeline_track_clients_insert AFTER INSERT ON clients
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline_track_clients();
CREATE TRIGGER pipeline_track_clients_update AFTER UPDATE ON clients
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline_track_clients();
CREATE TRIGGER pipeline_track_clients_delete AFTER DELETE ON clients
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline_track_clients();
CREATE TRIGGER pipeline_track_quotes_insert AFTER INSERT ON quotes
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline_track_quotes();
CREATE TRIGGER pipeline_track_quotes_update AFTER UPDATE ON quotes
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline_track_quotes();
CREATE TRIGGER pipeline_track_quotes_delete AFTER DELETE ON quotes
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline_track_quotes();


-- 3. Reading --------------------------------------------------------------------
-- Plain SQL without SET clauses, so that the planner inlines these into the
-- caller's query and plans them with the real tables' statistics.

-- The change a tenant's visible deltas with key <= p_upto (all with NULL)
-- make to its clients per stage. Rebuild marks carry no change.
CREATE FUNCTION pipeline_pending_stage_clients(p_tenant_id text, p_upto text)
RETURNS TABLE (stage text, clients bigint)
LANGUAGE sql STABLE
AS $$
    SELECT d.stage, sum(d.clients)::bigint
    FROM public.pipeline_deltas d
    WHERE d.tenant_id = p_tenant_id AND (p_upto IS NULL OR d.email_key <= p_upto)
      AND d.stage IS NOT NULL
    GROUP BY 1
    HAVING sum(d.clients) <> 0
$$;

-- The change the same deltas make to the value per stage and currency. Per
-- email key, value = sum over stages and currencies of n(s) * q(c), with n
-- the clients and q the priced quotes' sum (k their count, for matches). The
-- base tables hold n and q as of this snapshot, which already include every
-- visible delta, so the change is n*q - (n - dn)*(q - dq). That needs the
-- key's other visible deltas to be in the same batch: batches are whole keys.
-- n and q are looked up key by key in the email-key indexes (OFFSET 0 keeps
-- each lookup a parameterised index scan): a batch touches few keys of a
-- large tenant, which the log's statistics cannot tell the planner.
CREATE FUNCTION pipeline_pending_stage_values(p_tenant_id text, p_upto text)
RETURNS TABLE (stage text, currency char(3), amount numeric, matches bigint)
LANGUAGE sql STABLE
AS $$
    WITH dc AS (
        SELECT d.email_key, d.stage, sum(d.clients) AS dn
        FROM public.pipeline_deltas d
        WHERE d.tenant_id = p_tenant_id AND (p_upto IS NULL OR d.email_key <= p_upto)
          AND d.stage IS NOT NULL AND d.email_key <> ''
        GROUP BY 1, 2
    ), dq AS (
        SELECT d.email_key, d.currency, sum(d.amount) AS dq, sum(d.priced_quotes) AS dk
        FROM public.pipeline_deltas d
        WHERE d.tenant_id = p_tenant_id AND (p_upto IS NULL OR d.email_key <= p_upto)
          AND d.currency IS NOT NULL
        GROUP BY 1, 2
    ), keys AS (
        SELECT email_key FROM dc UNION SELECT email_key FROM dq
    ), n_now AS (
        SELECT k.email_key, c.stage, c.n
        FROM keys k
        CROSS JOIN LATERAL (
            SELECT c.pipeline_stage AS stage, count(*) AS n
            FROM public.clients c
            WHERE c.tenant_id = p_tenant_id AND c.email_key = k.email_key
            GROUP BY 1
            OFFSET 0
        ) c
    ), q_now AS (
        SELECT k.email_key, q.currency, q.q, q.k
        FROM keys k
        CROSS JOIN LATERAL (
            SELECT q.currency, sum(q.total_price) AS q, count(q.total_price) AS k
            FROM public.quotes q
            WHERE q.tenant_id = p_tenant_id AND q.email_key = k.email_key
              AND q.total_price IS NOT NULL
            GROUP BY 1
            OFFSET 0
        ) q
    ), n AS (
        SELECT coalesce(a.email_key, dc.email_key) AS email_key,
               coalesce(a.stage, dc.stage) AS stage,
               coalesce(a.n, 0) AS n_now,
               coalesce(a.n, 0) - coalesce(dc.dn, 0) AS n_before
        FROM n_now a
        FULL JOIN dc ON dc.email_key = a.email_key AND dc.stage = a.stage
    ), q AS (
        SELECT coalesce(a.email_key, dq.email_key) AS email_key,
               coalesce(a.currency, dq.currency) AS currency,
               coalesce(a.q, 0) AS q_now, coalesce(a.q, 0) - coalesce(dq.dq, 0) AS q_before,
               coalesce(a.k, 0) AS k_now, coalesce(a.k, 0) - coalesce(dq.dk, 0) AS k_before
        FROM q_now a
        FULL JOIN dq ON dq.email_key = a.email_key AND dq.currency = a.currency
    )
    SELECT n.stage, q.currency,
           sum(n.n_now * q.q_now - n.n_before * q.q_before),
           sum(n.n_now * q.k_now - n.n_before * q.k_before)::bigint
    FROM n JOIN q USING (email_key)
    GROUP BY 1, 2
    HAVING sum(n.n_now * q.k_now - n.n_before * q.k_before) <> 0
        OR sum(n.n_now * q.q_now - n.n_before * q.q_before) <> 0
$$;

-- The aggregates as of this snapshot: stored rows plus pending deltas. Exact
-- unless the tenant has a rebuild mark (pipeline_needs_recompute).
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

-- What the aggregates should hold, recomputed from clients and quotes: the
-- tenant's clients grouped by key and stage as one scan of the key index
-- reads them, merge-joined in key order with the priced quotes' key index.
-- Its callers turn hash joins, sorts and nested loops off: right after a bulk
-- load the statistics know nothing of the new rows, and the planner would
-- otherwise sort and hash millions of rows through temporary files (4 s
-- instead of 2 at 1M clients, more under load).
CREATE FUNCTION pipeline_expected_stage_clients(p_tenant_id text)
RETURNS TABLE (stage text, clients bigint)
LANGUAGE sql STABLE
AS $$
    SELECT c.pipeline_stage, count(*)
    FROM public.clients c
    WHERE c.tenant_id = p_tenant_id
    GROUP BY 1
$$;

CREATE FUNCTION pipeline_expected_stage_values(p_tenant_id text)
RETURNS TABLE (stage text, currency char(3), amount numeric, matches bigint)
LANGUAGE sql STABLE
AS $$
    SELECT ck.stage, q.currency, sum(q.total_price * ck.n), sum(ck.n)::bigint
    FROM (
        SELECT c.email_key, c.pipeline_stage AS stage, count(*) AS n
        FROM public.clients c
        WHERE c.tenant_id = p_tenant_id AND c.email_key IS NOT NULL
        GROUP BY 1, 2
    ) ck
    JOIN public.quotes q ON q.tenant_id = p_tenant_id AND q.email_key = ck.email_key
    WHERE q.total_price IS NOT NULL
    GROUP BY 1, 2
$$;


-- 4. Compaction and rebuild ----------------------------------------------------

-- Recompute one tenant's aggregates and forget its visible deltas and marks,
-- in one snapshot; the caller holds the tenant's lock. Deltas of
-- transactions still in flight commit later and are folded on top. A tenant
-- being deprovisioned is only emptied. Returns the deltas forgotten.
CREATE FUNCTION pipeline_rebuild_locked(p_tenant_id text) RETURNS bigint
LANGUAGE plpgsql
SET search_path = public, pg_temp
SET enable_nestloop = off
SET enable_hashjoin = off
SET enable_sort = off
AS $$
DECLARE
    v_live boolean;
    v_forgotten bigint;
BEGIN
    -- A statement started now sees what committed while the lock was awaited.
    v_live := EXISTS (SELECT 1 FROM tenants WHERE id = p_tenant_id AND status <> 'deprovisioning');
    DELETE FROM pipeline_stage_values WHERE tenant_id = p_tenant_id;
    DELETE FROM pipeline_stage_clients WHERE tenant_id = p_tenant_id;
    WITH forgotten AS (
        DELETE FROM pipeline_deltas WHERE tenant_id = p_tenant_id RETURNING 1
    ), stage_clients AS (
        INSERT INTO pipeline_stage_clients (tenant_id, stage, clients)
        SELECT p_tenant_id, e.stage, e.clients
        FROM pipeline_expected_stage_clients(p_tenant_id) e
        WHERE v_live
    ), stage_values AS (
        INSERT INTO pipeline_stage_values (tenant_id, stage, currency, amount, matches)
        SELECT p_tenant_id, e.stage, e.currency, e.amount, e.matches
        FROM pipeline_expected_stage_values(p_tenant_id) e
        WHERE v_live
    )
    SELECT count(*) INTO v_forgotten FROM forgotten;
    RETURN v_forgotten;
END
$$;

-- Rebuild one tenant's aggregates from its clients and quotes, online: it
-- waits for the tenant's lock (a compaction or another rebuild of it), and
-- writers go on undisturbed. For operators (`python -m crm_svc verify
-- --repair`) and for a tenant that leaves 'deprovisioning'. Returns 1 if the
-- tenant exists and is maintained, else 0. Run it under READ COMMITTED.
CREATE FUNCTION pipeline_aggregates_rebuild(p_tenant_id text) RETURNS integer
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(pipeline_lock_space(), pipeline_tenant_lock_key(p_tenant_id));
    PERFORM pipeline_rebuild_locked(p_tenant_id);
    RETURN (SELECT count(*) FROM tenants WHERE id = p_tenant_id AND status <> 'deprovisioning');
END
$$;

-- The compactor's rebuild: only if the tenant still needs it, and never
-- waiting (another replica may be at it). Returns {"rebuilt": bool, "busy":
-- bool, "forgotten": deltas dropped}.
CREATE FUNCTION pipeline_rebuild_if_needed(p_tenant_id text) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pipeline_rebuild_if_needed must run under READ COMMITTED'
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'READ_COMMITTED_REQUIRED';
    END IF;
    IF NOT pg_try_advisory_xact_lock(pipeline_lock_space(), pipeline_tenant_lock_key(p_tenant_id)) THEN
        RETURN jsonb_build_object('rebuilt', false, 'busy', true, 'forgotten', 0);
    END IF;
    IF NOT pipeline_needs_recompute(p_tenant_id)
       OR NOT EXISTS (SELECT 1 FROM tenants WHERE id = p_tenant_id AND status <> 'deprovisioning') THEN
        RETURN jsonb_build_object('rebuilt', false, 'busy', false, 'forgotten', 0);
    END IF;
    RETURN jsonb_build_object('rebuilt', true, 'busy', false,
                              'forgotten', pipeline_rebuild_locked(p_tenant_id));
END
$$;

-- Fold up to about p_max_deltas committed deltas into the aggregates, over
-- the tenants that have some (up to 200 per call, a random sample when more
-- wait). Each tenant first gets an equal share; what the small backlogs leave
-- unused goes to the larger ones in a second round, so no tenant starves and
-- a lone large backlog gets the whole batch. A tenant's share is cut at a
-- whole email key. Tenants that need a rebuild (pipeline_needs_recompute) are
-- not folded but listed in "rebuild", largest backlog first, for the caller to
-- rebuild with a budget of its own (pipeline_rebuild_if_needed). Tenants being
-- deprovisioned are left alone (deprovisioning deletes their deltas); a
-- tenant whose lock is held elsewhere is skipped; the deltas of a tenant that
-- no longer exists are dropped.
-- Returns {"compacted": deltas folded, "tenants": tenants folded, "busy":
-- tenants skipped, "discarded": deltas of tenants gone, "more": whether a
-- call now would find more, "rebuild": [tenant ids]}. Run it under READ
-- COMMITTED: each statement must see what committed before it.
CREATE FUNCTION pipeline_compact(p_max_deltas integer DEFAULT 10000) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = public, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET enable_nestloop = off
AS $$
DECLARE
    -- Advisory locks share the lock table: bound how many one call takes.
    c_max_tenants CONSTANT integer := 200;
    v_candidates text[];
    v_tenant text;
    v_status text;
    v_backlog bigint;
    v_rebuild text[] := '{}';
    v_rebuild_sizes bigint[] := '{}';
    v_waiting text[] := '{}';   -- locked and foldable, with their backlog (capped)
    v_waiting_sizes bigint[] := '{}';
    v_busy integer := 0;
    v_discarded bigint := 0;
    v_folded_tenants integer := 0;
    v_budget bigint := p_max_deltas;
    v_share bigint;
    v_round integer;
    v_i integer;
    v_upto text;
    v_picked bigint;
    v_compacted bigint := 0;
    v_more boolean;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pipeline_compact must run under READ COMMITTED'
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'READ_COMMITTED_REQUIRED';
    END IF;
    IF p_max_deltas IS NULL OR p_max_deltas < 1 THEN
        RAISE EXCEPTION 'p_max_deltas must be at least 1'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'INVALID_BATCH_SIZE';
    END IF;

    -- The tenants with deltas (one index probe each: a loose index scan),
    -- except those being deprovisioned; a random sample if there are too many.
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
        LIMIT least(c_max_tenants, p_max_deltas) + 1);
    v_more := cardinality(v_candidates) > least(c_max_tenants, p_max_deltas);

    FOREACH v_tenant IN ARRAY v_candidates[1:least(c_max_tenants, p_max_deltas)] LOOP
        IF NOT pg_try_advisory_xact_lock(pipeline_lock_space(), pipeline_tenant_lock_key(v_tenant)) THEN
            v_busy := v_busy + 1;
            CONTINUE;
        END IF;
        -- Read after the lock: a status change holds it until it commits.
        v_status := (SELECT status FROM tenants WHERE id = v_tenant);
        IF v_status IS NULL THEN
            -- The tenant is gone: what it left here counts for nothing.
            DELETE FROM pipeline_deltas WHERE tenant_id = v_tenant;
            GET DIAGNOSTICS v_picked = ROW_COUNT;
            v_discarded := v_discarded + v_picked;
        ELSIF v_status = 'deprovisioning' THEN
            CONTINUE;
        ELSIF pipeline_needs_recompute(v_tenant) THEN
            v_rebuild := v_rebuild || v_tenant;
            v_rebuild_sizes := v_rebuild_sizes
                || (SELECT count(*) FROM pipeline_deltas WHERE tenant_id = v_tenant);
        ELSE
            v_waiting := v_waiting || v_tenant;
            v_waiting_sizes := v_waiting_sizes || (
                SELECT count(*) FROM (
                    SELECT 1 FROM pipeline_deltas WHERE tenant_id = v_tenant LIMIT p_max_deltas + 1) d);
        END IF;
    END LOOP;
    -- A busy tenant is being compacted (or rebuilt) elsewhere: it may have more.
    v_more := v_more OR v_busy > 0;

    -- Two rounds: equal shares, then what is left to those that had more.
    FOR v_round IN 1..2 LOOP
        EXIT WHEN v_budget <= 0;
        v_share := (SELECT count(*) FROM unnest(v_waiting_sizes) s WHERE s > 0);
        EXIT WHEN v_share = 0;
        v_share := greatest(v_budget / v_share, 1);
        FOR v_i IN 1..coalesce(cardinality(v_waiting), 0) LOOP
            CONTINUE WHEN v_waiting_sizes[v_i] <= 0 OR v_budget <= 0;
            v_tenant := v_waiting[v_i];
            -- This batch: the tenant's deltas up to the key of its v_share-th
            -- (all, when fewer), marks excepted.
            v_upto := (SELECT d.email_key FROM pipeline_deltas d WHERE d.tenant_id = v_tenant
                       ORDER BY d.email_key OFFSET v_share - 1 LIMIT 1);

            -- One statement, one snapshot: the deltas deleted are exactly those
            -- the pending_* functions count, against the base rows they describe.
            WITH picked AS (
                DELETE FROM pipeline_deltas d
                WHERE d.tenant_id = v_tenant AND (v_upto IS NULL OR d.email_key <= v_upto)
                  AND (d.stage IS NOT NULL OR d.currency IS NOT NULL)
                RETURNING 1
            ), stage_values AS (
                INSERT INTO pipeline_stage_values AS v (tenant_id, stage, currency, amount, matches)
                SELECT v_tenant, p.stage, p.currency, p.amount, p.matches
                FROM pipeline_pending_stage_values(v_tenant, v_upto) p
                ORDER BY p.stage, p.currency
                ON CONFLICT (tenant_id, stage, currency) DO UPDATE
                    SET amount = v.amount + excluded.amount, matches = v.matches + excluded.matches
            ), stage_clients AS (
                INSERT INTO pipeline_stage_clients AS s (tenant_id, stage, clients)
                SELECT v_tenant, p.stage, p.clients
                FROM pipeline_pending_stage_clients(v_tenant, v_upto) p
                ORDER BY p.stage
                ON CONFLICT (tenant_id, stage) DO UPDATE SET clients = s.clients + excluded.clients
            )
            SELECT count(*) INTO v_picked FROM picked;
            v_compacted := v_compacted + v_picked;
            v_budget := v_budget - v_picked;
            IF v_round = 1 THEN
                v_folded_tenants := v_folded_tenants + 1;
            END IF;
            -- Sizes are counts capped at the batch: ask the index what is left.
            IF v_upto IS NULL OR NOT EXISTS (
                SELECT 1 FROM pipeline_deltas d WHERE d.tenant_id = v_tenant AND d.email_key > v_upto)
            THEN
                v_waiting_sizes[v_i] := 0;
            ELSE
                v_waiting_sizes[v_i] := greatest(v_waiting_sizes[v_i] - v_picked, 1);
            END IF;
        END LOOP;
    END LOOP;
    -- Rows only reach zero through a negative delta; none of them is kept.
    IF v_compacted > 0 THEN
        DELETE FROM pipeline_stage_clients
        WHERE tenant_id = ANY (v_waiting) AND clients = 0;
        DELETE FROM pipeline_stage_values
        WHERE tenant_id = ANY (v_waiting) AND matches = 0;
    END IF;
    v_more := v_more OR EXISTS (SELECT 1 FROM unnest(v_waiting_sizes) s WHERE s > 0);

    RETURN jsonb_build_object(
        'compacted', v_compacted, 'tenants', v_folded_tenants, 'busy', v_busy,
        'discarded', v_discarded, 'more', v_more,
        'rebuild', to_jsonb(ARRAY(SELECT t FROM unnest(v_rebuild, v_rebuild_sizes) r (t, n)
                                  ORDER BY n DESC)));
END
$$;


-- 5. The summary -------------------------------------------------------------------

-- The summary document from a tenant's clients per stage and value per stage
-- and currency (only pairs with matches > 0 are shown). Amounts travel as
-- decimal strings: JSON numbers would go through floats.
CREATE FUNCTION pipeline_summary_document(p_stage_clients jsonb, p_stage_values jsonb)
RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    WITH stage_counts AS (
        SELECT key AS stage, value::bigint AS client_count FROM jsonb_each_text(p_stage_clients)
    ), stage_values AS (
        SELECT v ->> 'stage' AS stage, v ->> 'currency' AS currency, (v ->> 'amount')::numeric AS amount
        FROM jsonb_array_elements(p_stage_values) v
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
            FROM public.pipeline_stages s
            LEFT JOIN stage_counts c ON c.stage = s.stage),
        'total_clients', (SELECT coalesce(sum(client_count), 0) FROM stage_counts),
        'open_value', coalesce((
            SELECT jsonb_agg(jsonb_build_object('currency', currency, 'amount', amount::text)
                   ORDER BY currency)
            FROM (
                SELECT v.currency, sum(v.amount) AS amount
                FROM stage_values v
                JOIN public.pipeline_stages s ON s.stage = v.stage
                WHERE s.open
                GROUP BY v.currency
            ) open_sums), '[]'::jsonb),
        'computed_at', clock_timestamp())
$$;

CREATE FUNCTION pipeline_check_readable(p_tenant_id text) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = public, pg_temp
AS $$
DECLARE
    v_status text;
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
    RETURN v_status;
END
$$;

-- The full scan: what the summary must equal, whatever the aggregates hold.
-- About 1.5 s for a 1M-client tenant on the 2-CPU bench machine. The plan is
-- pinned (see pipeline_expected_stage_values): one pass over each key index.
CREATE FUNCTION pipeline_summary_recompute(p_tenant_id text) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = public, pg_temp
SET enable_nestloop = off
SET enable_hashjoin = off
SET enable_sort = off
AS $$
BEGIN
    PERFORM pipeline_check_readable(p_tenant_id);
    RETURN pipeline_summary_document(
        (SELECT coalesce(jsonb_object_agg(stage, clients), '{}')
         FROM pipeline_expected_stage_clients(p_tenant_id)),
        (SELECT coalesce(jsonb_agg(jsonb_build_object(
                    'stage', stage, 'currency', currency, 'amount', amount)), '[]')
         FROM pipeline_expected_stage_values(p_tenant_id)));
END
$$;

-- The summary PipelineSummary returns: the aggregates plus the pending
-- deltas, in one snapshot (at most 6 + 6 x currencies rows plus the deltas),
-- or the full scan when that is cheaper or the tenant is marked for a rebuild.
-- Exact either way; its cost is bounded by the full scan's at any lag.
-- The log's statistics are usually those of an almost empty table: left
-- alone, the planner seq-scans all of it rather than probe one tenant's keys.
-- No bitmap scans of the log either: only plain index scans mark the entries
-- of compacted deltas dead, so that the next read skips them instead of
-- visiting every one until autovacuum comes by.
CREATE FUNCTION pipeline_summary(p_tenant_id text) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = public, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET enable_nestloop = off
AS $$
BEGIN
    PERFORM pipeline_check_readable(p_tenant_id);
    IF pipeline_needs_recompute(p_tenant_id) THEN
        RETURN pipeline_summary_recompute(p_tenant_id);
    END IF;
    RETURN pipeline_summary_document(
        (SELECT coalesce(jsonb_object_agg(stage, clients), '{}')
         FROM pipeline_current_stage_clients(p_tenant_id)),
        (SELECT coalesce(jsonb_agg(jsonb_build_object(
                    'stage', stage, 'currency', currency, 'amount', amount)), '[]')
         FROM pipeline_current_stage_values(p_tenant_id)
         WHERE matches > 0));
END
$$;

-- For operators (python -m crm_svc verify): the tenants, and for one tenant
-- its stored aggregates plus pending deltas against a recomputation, row by
-- row, in one snapshot (STABLE), so concurrent writes never show up as drift.
CREATE FUNCTION pipeline_verify_tenants() RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = public, pg_temp
AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object('tenant_id', id, 'status', status) ORDER BY id),
                    '[]'::jsonb)
    FROM tenants
$$;

CREATE FUNCTION pipeline_verify(p_tenant_id text) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = public, pg_temp
SET enable_nestloop = off
SET enable_hashjoin = off
SET enable_sort = off
AS $$
DECLARE
    v_status text;
    v_aggregated jsonb;
    v_recomputed jsonb;
    v_rows jsonb;
    v_marked boolean;
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
    v_marked := EXISTS (SELECT 1 FROM pipeline_deltas
                        WHERE tenant_id = p_tenant_id AND email_key = ''
                          AND stage IS NULL AND currency IS NULL);
    -- A marked tenant's aggregates are due for a rebuild, not drifting.
    IF v_marked THEN
        v_rows := jsonb_build_object('pipeline_stage_clients', 0, 'pipeline_stage_values', 0);
    ELSE
        SELECT jsonb_build_object(
            'pipeline_stage_clients', (
                SELECT count(*)
                FROM pipeline_current_stage_clients(p_tenant_id) a
                FULL JOIN pipeline_expected_stage_clients(p_tenant_id) e USING (stage)
                WHERE a.clients IS DISTINCT FROM e.clients),
            'pipeline_stage_values', (
                SELECT count(*)
                FROM pipeline_current_stage_values(p_tenant_id) a
                FULL JOIN pipeline_expected_stage_values(p_tenant_id) e USING (stage, currency)
                WHERE a.amount IS DISTINCT FROM e.amount OR a.matches IS DISTINCT FROM e.matches)
        ) INTO v_rows;
    END IF;

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
        'pending_deltas', (SELECT count(*) FROM pipeline_deltas WHERE tenant_id = p_tenant_id),
        'rebuild_marked', v_marked);
END
$$;

-- The largest backlogs, for operators and the compactor's gauges: the top
-- p_top tenants by pending deltas and the total. Counts the whole log.
CREATE FUNCTION pipeline_backlog(p_top integer DEFAULT 10) RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = public, pg_temp
AS $$
    WITH per_tenant AS (
        SELECT tenant_id, count(*) AS deltas,
               bool_or(email_key = '' AND stage IS NULL AND currency IS NULL) AS rebuild_marked
        FROM pipeline_deltas GROUP BY 1
    )
    SELECT jsonb_build_object(
        'total', (SELECT coalesce(sum(deltas), 0) FROM per_tenant),
        'tenants', coalesce((
            SELECT jsonb_agg(jsonb_build_object('tenant_id', tenant_id, 'deltas', deltas,
                                                'rebuild_marked', rebuild_marked)
                             ORDER BY deltas DESC, tenant_id)
            FROM (SELECT * FROM per_tenant ORDER BY deltas DESC, tenant_id LIMIT p_top) top),
            '[]'::jsonb))
$$;


-- 6. TRUNCATE and status changes --------------------------------------------------

-- TRUNCATE fires no row or statement triggers of the kinds above. Nothing
-- needs recomputing: with no quotes every value is zero, with no clients
-- every aggregate is (PostgreSQL only truncates clients together with
-- quotes, which reference it). So the derived rows are emptied, as fast as
-- the TRUNCATE itself: summaries wait for it to commit, as reads of the
-- truncated tables do.
CREATE FUNCTION pipeline_truncated() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    IF TG_TABLE_NAME = 'clients' THEN
        TRUNCATE pipeline_stage_clients, pipeline_stage_values, pipeline_deltas;
    ELSE
        TRUNCATE pipeline_stage_values;
        DELETE FROM pipeline_deltas WHERE currency IS NOT NULL;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER pipeline_truncated AFTER TRUNCATE ON clients
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline_truncated();
CREATE TRIGGER pipeline_truncated AFTER TRUNCATE ON quotes
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline_truncated();

-- A status change waits for the tenant's compaction or rebuild and holds
-- back new ones until it commits, which then see the new status. Nothing was
-- maintained while the tenant was being deprovisioned: if it becomes active
-- again, its aggregates are rebuilt.
CREATE FUNCTION pipeline_tenant_status_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(pipeline_lock_space(), pipeline_tenant_lock_key(NEW.id));
    IF OLD.status = 'deprovisioning' AND NEW.status <> 'deprovisioning' THEN
        PERFORM pipeline_rebuild_locked(NEW.id);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER pipeline_tenant_status_changed AFTER UPDATE OF status ON tenants
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION pipeline_tenant_status_changed();

-- Our rows computed from the tenant's data: deprovisioning deletes them with
-- the tenant and reports them apart from its own (deprovision_tables in 0003).
-- The log has no foreign key to tenants, so it names its tenant column.
COMMENT ON TABLE pipeline_stage_clients IS '@deprovision derived';
COMMENT ON TABLE pipeline_stage_values IS '@deprovision derived';
COMMENT ON TABLE pipeline_deltas IS '@deprovision derived tenant_column=tenant_id';
