-- Deprovisioning a tenant (docs/design.md, "Deprovisioning"): the job's lease, the log of
-- requests that drove each job, and the SQL functions the provisioning
-- service calls. Each function is one transaction (one Database.call).
--
-- Concurrency: a job is worked on by the call that holds its lease
-- (lease_owner, lease_expires_at = that call's gRPC deadline). Every function
-- that changes a job first checks the lease, so a call whose lease has passed
-- can no longer write. A crashed call's lease simply expires.
--
-- Domain errors carry a SQLSTATE and a HINT naming the ErrorInfo reason
-- (shared/database/errors.py): 55006 -> ABORTED, 55000 -> FAILED_PRECONDITION.

ALTER TABLE deprovision_jobs
    ADD COLUMN lease_owner uuid,
    ADD COLUMN lease_expires_at timestamptz,
    ALTER COLUMN steps SET DEFAULT '{}';

-- steps: step name -> {outcome, detail, rows, derived_rows, at}, e.g.
-- {"TENANT_DATA": {"outcome": "DONE", "detail": "...", "rows": {"clients": 12},
--                  "derived_rows": {"pipeline_stage_clients": 3}, "at": "..."}}
-- rows counts the tenant's own data, derived_rows our rows computed from it.
UPDATE deprovision_jobs SET steps = '{}' WHERE steps = '[]';
ALTER TABLE deprovision_jobs
    ADD CONSTRAINT deprovision_jobs_steps_object CHECK (jsonb_typeof(steps) = 'object');

-- At most one unfinished job per tenant: another request resumes it.
CREATE UNIQUE INDEX deprovision_jobs_one_open_per_tenant
    ON deprovision_jobs (tenant_id) WHERE state IN ('RUNNING', 'FAILED');

-- The audit trail outlives the tenant: not the tenant's data (deprovision_tables).
COMMENT ON TABLE deprovision_jobs IS '@deprovision keep';

-- Every request id that drove a job, with its caller (audit; idempotency).
-- No tenant_id column on purpose: tables with one are the tenant's data.
CREATE TABLE deprovision_requests (
    request_id  uuid PRIMARY KEY,
    job_id      uuid NOT NULL REFERENCES deprovision_jobs (id),
    actor       text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX deprovision_requests_job_idx ON deprovision_requests (job_id);
INSERT INTO deprovision_requests (request_id, job_id, actor, received_at)
SELECT request_id, id, actor, started_at FROM deprovision_jobs;


-- The tables a tenant owns, found from the catalog so that tables added later
-- are deprovisioned too (README, "Deprovisioning"). A table of this schema is
-- the tenant's when each of its rows can be attributed to one tenant:
--   * by a tenant column of its own: one with a foreign key to tenants(id),
--     whatever its name; one that a foreign key maps onto a tenant column of
--     the referenced table (quotes.tenant_id through (tenant_id, client_id) ->
--     clients); or one its table comment declares (see the markers below);
--   * else through exactly one chain of foreign keys to a table that has one
--     (a grandchild: its parent's key, then the parent's tenant column).
-- Refused (refusal is set; deprovision_assert_tables raises before anything
-- is touched): two different tenant columns, or several chains (a row could
-- belong to two tenants: which rows go would be a guess); a column whose name
-- says tenant with no attribution at all; an unknown marker.
--
-- Markers, a line of the table's COMMENT (a table opts in where it is created):
--   @deprovision derived            our rows computed from the tenant's data
--                                   (e.g. the pipeline aggregates), reported
--                                   apart from the tenant's own data
--   @deprovision keep               not the tenant's, never deleted (the audit)
--   @deprovision tenant_column=col  col holds the tenant id, without a foreign key
--
-- tenant_predicate: a condition on the table aliased t, with the tenant id as
-- $1 (a chain is nested EXISTS on the parents' keys, each an index probe when
-- the foreign key's columns are indexed); tenant_path says the same for people.
-- delete_order: 0 for tables no other owned table references, else one more
-- than the highest of the tables referencing it, so ascending order deletes
-- children before parents. A table on a foreign-key cycle reaches
-- delete_order >= the number of tables (in_cycle).
CREATE FUNCTION deprovision_tables()
RETURNS TABLE (rel regclass, table_name text, delete_order int, self_referencing boolean,
               in_cycle boolean, derived boolean, tenant_path text, tenant_predicate text,
               refusal text)
LANGUAGE sql STABLE
SET search_path = public, pg_temp
AS $$
    WITH RECURSIVE
    candidates AS (
        SELECT c.oid, c.relname::text AS name
        FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace
          AND c.relkind IN ('r', 'p')
          AND NOT c.relispartition
          AND c.oid <> 'tenants'::regclass
    ),
    markers AS (
        SELECT c.oid, m.word
        FROM candidates c,
             regexp_split_to_table(obj_description(c.oid, 'pg_class'), '\n') AS line,
             regexp_split_to_table(substring(line FROM '^\s*@deprovision\s+(.*\S)\s*$'), '\s+')
                 AS m(word)
    ),
    unknown_markers AS (
        SELECT oid, string_agg(word, ', ' ORDER BY word) AS words
        FROM markers
        WHERE word NOT IN ('derived', 'keep')
          AND NOT EXISTS (
              SELECT 1 FROM pg_attribute a
              WHERE a.attrelid = markers.oid AND a.attnum > 0 AND NOT a.attisdropped
                AND a.attname = substring(word FROM '^tenant_column=(\w+)$'))
        GROUP BY oid
    ),
    -- Tables that are neither the tenant's nor refused, whatever they reference.
    kept AS (
        SELECT oid FROM markers WHERE word = 'keep'
    ),
    considered AS (
        SELECT c.* FROM candidates c WHERE c.oid NOT IN (SELECT oid FROM kept)
    ),
    fks AS (
        SELECT con.conrelid AS child, con.confrelid AS parent,
               array_agg(ca.attname::text ORDER BY k.i) AS child_columns,
               array_agg(pa.attname::text ORDER BY k.i) AS parent_columns
        FROM pg_constraint con
        CROSS JOIN LATERAL unnest(con.conkey, con.confkey)
            WITH ORDINALITY AS k(child_attnum, parent_attnum, i)
        JOIN pg_attribute ca ON ca.attrelid = con.conrelid AND ca.attnum = k.child_attnum
        JOIN pg_attribute pa ON pa.attrelid = con.confrelid AND pa.attnum = k.parent_attnum
        WHERE con.contype = 'f'
          AND con.conrelid IN (SELECT oid FROM considered)
          AND (con.confrelid = 'tenants'::regclass
               OR con.confrelid IN (SELECT oid FROM considered))
        GROUP BY con.oid, con.conrelid, con.confrelid
    ),
    -- (table, column) pairs whose column holds the tenant id.
    tenant_columns (oid, name) AS (
        SELECT child, child_columns[1] FROM fks
        WHERE parent = 'tenants'::regclass AND parent_columns = ARRAY['id']
        UNION
        SELECT m.oid, a.attname::text
        FROM markers m
        JOIN considered c USING (oid)
        JOIN pg_attribute a
          ON a.attrelid = m.oid AND a.attnum > 0 AND NOT a.attisdropped
         AND a.attname = substring(m.word FROM '^tenant_column=(\w+)$')
        UNION
        SELECT f.child, f.child_columns[k.i]
        FROM tenant_columns tc
        JOIN fks f ON f.parent = tc.oid AND f.child <> f.parent
        CROSS JOIN LATERAL generate_subscripts(f.parent_columns, 1) AS k(i)
        WHERE f.parent_columns[k.i] = tc.name
    ),
    direct AS (
        SELECT oid, min(name) AS name, string_agg(name, ', ' ORDER BY name) AS names,
               count(*) > 1 AS ambiguous
        FROM tenant_columns
        GROUP BY oid
    ),
    -- Chains of foreign keys from a table without a tenant column towards one with.
    chains (start, at, visited, depth, predicate, path) AS (
        SELECT c.oid, f.parent, ARRAY[c.oid, f.parent], 1,
               format('EXISTS (SELECT 1 FROM %s p1 WHERE %s', f.parent::regclass,
                      (SELECT string_agg(format('p1.%I = t.%I', pc, cc), ' AND ')
                       FROM unnest(f.child_columns, f.parent_columns) AS u(cc, pc))),
               format('%I(%s) -> %s(%s)', c.name, array_to_string(f.child_columns, ', '),
                      f.parent::regclass, array_to_string(f.parent_columns, ', '))
        FROM considered c
        JOIN fks f ON f.child = c.oid AND f.parent <> c.oid AND f.parent <> 'tenants'::regclass
        WHERE c.oid NOT IN (SELECT oid FROM direct)
        UNION ALL
        SELECT ch.start, f.parent, ch.visited || f.parent, ch.depth + 1,
               ch.predicate || format(' AND EXISTS (SELECT 1 FROM %s p%s WHERE %s',
                   f.parent::regclass, ch.depth + 1,
                   (SELECT string_agg(format('p%s.%I = p%s.%I', ch.depth + 1, pc, ch.depth, cc),
                                      ' AND ')
                    FROM unnest(f.child_columns, f.parent_columns) AS u(cc, pc))),
               ch.path || format('; %s(%s) -> %s(%s)', f.child::regclass,
                                 array_to_string(f.child_columns, ', '), f.parent::regclass,
                                 array_to_string(f.parent_columns, ', '))
        FROM chains ch
        JOIN fks f ON f.child = ch.at AND f.parent <> 'tenants'::regclass
        WHERE ch.at NOT IN (SELECT oid FROM direct)
          AND f.parent <> ALL (ch.visited)
    ),
    complete_chains AS (
        SELECT ch.start,
               ch.predicate || format(' AND p%s.%I = $1', ch.depth, d.name)
                   || repeat(')', ch.depth) AS predicate,
               ch.path || format('; %s.%I', ch.at::regclass, d.name) AS path,
               d.ambiguous
        FROM chains ch
        JOIN direct d ON d.oid = ch.at
    ),
    chained AS (
        SELECT start AS oid, min(predicate) AS predicate, min(path) AS path,
               count(*) > 1 OR bool_or(ambiguous) AS ambiguous,
               string_agg(path, ' | ' ORDER BY path) AS paths
        FROM complete_chains
        GROUP BY start
    ),
    attribution AS (
        SELECT c.oid, c.name,
               coalesce(d.oid, ch.oid) IS NOT NULL AS owned,
               CASE WHEN d.oid IS NOT NULL THEN format('t.%I = $1', d.name)
                    ELSE ch.predicate END AS predicate,
               CASE WHEN d.oid IS NOT NULL THEN format('%I.%I', c.name, d.name)
                    ELSE ch.path END AS path,
               CASE
                   WHEN u.oid IS NOT NULL THEN
                       format('unknown @deprovision marker in its comment: %s', u.words)
                   WHEN d.ambiguous THEN
                       format('several columns hold a tenant id (%s): a row could belong to'
                              ' two tenants', d.names)
                   WHEN ch.ambiguous THEN
                       format('it reaches tenants through several chains of foreign keys,'
                              ' or through an ambiguous table (%s)', ch.paths)
                   WHEN d.oid IS NULL AND ch.oid IS NULL THEN (
                       SELECT format('its column %s looks like a tenant id, but no foreign key'
                                     ' to tenants(id) or to a tenant table attributes it'
                                     ' (add one, or mark the table: @deprovision keep or'
                                     ' tenant_column=<column>)',
                                     string_agg(a.attname::text, ', ' ORDER BY a.attnum))
                       FROM pg_attribute a
                       WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                         AND a.attname ILIKE '%tenant%'
                       HAVING count(*) > 0)
               END AS refusal
        FROM candidates c
        LEFT JOIN direct d ON d.oid = c.oid
        LEFT JOIN chained ch ON ch.oid = c.oid
        LEFT JOIN unknown_markers u ON u.oid = c.oid
        WHERE c.oid NOT IN (SELECT oid FROM kept) OR u.oid IS NOT NULL
    ),
    owned AS (
        SELECT oid, name FROM attribution WHERE owned AND refusal IS NULL
    ),
    edges AS (
        SELECT DISTINCT child, parent
        FROM fks
        WHERE child <> parent
          AND child IN (SELECT oid FROM owned)
          AND parent IN (SELECT oid FROM owned)
    ),
    heights (oid, height) AS (
        SELECT oid, 0 FROM owned
        UNION ALL
        SELECT e.parent, h.height + 1
        FROM heights h
        JOIN edges e ON e.child = h.oid
        WHERE h.height < (SELECT count(*) FROM owned)
    ),
    ordered AS (
        SELECT oid, max(height)::int AS delete_order,
               max(height) >= (SELECT count(*) FROM owned) AS in_cycle
        FROM heights
        GROUP BY oid
    )
    SELECT a.oid::regclass,
           a.name,
           o.delete_order,
           EXISTS (SELECT 1 FROM pg_constraint con
                   WHERE con.contype = 'f' AND con.conrelid = a.oid AND con.confrelid = a.oid),
           coalesce(o.in_cycle, false),
           EXISTS (SELECT 1 FROM markers m WHERE m.oid = a.oid AND m.word = 'derived'),
           CASE WHEN a.refusal IS NULL THEN a.path END,
           CASE WHEN a.refusal IS NULL THEN a.predicate END,
           a.refusal
    FROM attribution a
    LEFT JOIN ordered o USING (oid)
    WHERE a.refusal IS NOT NULL OR a.owned
    ORDER BY 3, 2
$$;

-- Refuses to delete anything when a table cannot be attributed to a tenant
-- (see deprovision_tables) or the order is undefined (a foreign-key cycle
-- between tenant tables), rather than leave rows behind or fail half-way.
CREATE FUNCTION deprovision_assert_tables() RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = public, pg_temp
AS $$
DECLARE
    v_refused text;
    v_cycle text;
BEGIN
    SELECT string_agg(format('%s (%s)', table_name, refusal), '; ' ORDER BY table_name)
               FILTER (WHERE refusal IS NOT NULL),
           string_agg(table_name, ', ' ORDER BY table_name) FILTER (WHERE in_cycle)
    INTO v_refused, v_cycle
    FROM deprovision_tables()
    WHERE refusal IS NOT NULL OR in_cycle;
    IF v_refused IS NOT NULL THEN
        RAISE EXCEPTION 'cannot attribute the rows of these tables to a tenant: %', v_refused
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'TENANT_TABLE_UNATTRIBUTED';
    END IF;
    IF v_cycle IS NOT NULL THEN
        RAISE EXCEPTION 'tenant tables form a foreign-key cycle: %', v_cycle
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'TENANT_TABLES_CYCLE';
    END IF;
    PERFORM tenant_write_guard_assert();
END
$$;


-- A step entry of deprovision_jobs.steps.
CREATE FUNCTION deprovision_step(
    p_outcome text, p_detail text, p_rows jsonb DEFAULT NULL, p_derived_rows jsonb DEFAULT NULL
) RETURNS jsonb
LANGUAGE sql VOLATILE
AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'outcome', p_outcome, 'detail', p_detail, 'rows', p_rows, 'derived_rows', p_derived_rows,
        'at', clock_timestamp()))
$$;


-- Two {table: rows} maps added up table by table.
CREATE FUNCTION deprovision_add_rows(p_rows jsonb, p_more jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE
AS $$
    SELECT coalesce(jsonb_object_agg(key, total), '{}')
    FROM (
        SELECT key, sum(value::bigint) AS total
        FROM (SELECT key, value FROM jsonb_each_text(coalesce(p_rows, '{}'))
              UNION ALL
              SELECT key, value FROM jsonb_each_text(coalesce(p_more, '{}'))) counts
        GROUP BY key
    ) totals
$$;


-- The TENANT_DATA step's detail: "12 rows of the tenant's data and 4 derived rows deleted".
CREATE FUNCTION deprovision_rows_detail(p_rows jsonb, p_derived_rows jsonb, p_done text)
RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
    SELECT format('%s rows of the tenant''s data and %s derived rows %s',
                  (SELECT coalesce(sum(value::bigint), 0) FROM jsonb_each_text(p_rows)),
                  (SELECT coalesce(sum(value::bigint), 0) FROM jsonb_each_text(p_derived_rows)),
                  p_done)
$$;


-- What the service gets back about a job.
CREATE FUNCTION deprovision_job_document(p_job deprovision_jobs) RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT jsonb_build_object(
        'id', p_job.id,
        'tenant_id', p_job.tenant_id,
        'request_id', p_job.request_id,
        'actor', p_job.actor,
        'state', p_job.state,
        'sendgrid_username', p_job.sendgrid_username,
        'steps', p_job.steps,
        'error', p_job.error,
        'started_at', p_job.started_at,
        'finished_at', p_job.finished_at)
$$;


-- The job p_job_id, locked, provided the call p_lease_owner still holds it.
CREATE FUNCTION deprovision_leased_job(p_job_id uuid, p_lease_owner uuid)
RETURNS deprovision_jobs
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    v_job deprovision_jobs;
BEGIN
    SELECT * INTO v_job FROM deprovision_jobs WHERE id = p_job_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'deprovisioning job % does not exist', p_job_id
            USING ERRCODE = 'no_data_found', HINT = 'JOB_NOT_FOUND';
    END IF;
    IF v_job.state <> 'RUNNING'
       OR v_job.lease_owner IS DISTINCT FROM p_lease_owner
       OR v_job.lease_expires_at <= clock_timestamp() THEN
        RAISE EXCEPTION 'deprovisioning job % is no longer held by this call', p_job_id
            USING ERRCODE = 'object_in_use', HINT = 'LEASE_LOST';
    END IF;
    RETURN v_job;
END
$$;


-- Rows per owned table of one tenant, every table listed (0 included):
-- {rows: the tenant's own data, derived_rows: ours}. A count reads the
-- tenant's entries of the index on its tenant column (of each parent's key
-- for a chain), so it takes time in proportion to the tenant's rows.
CREATE FUNCTION deprovision_count_rows(p_tenant_id text) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = public, pg_temp
AS $$
DECLARE
    v_table record;
    v_count bigint;
    v_rows jsonb := '{}';
    v_derived jsonb := '{}';
BEGIN
    FOR v_table IN SELECT * FROM deprovision_tables() ORDER BY delete_order, table_name LOOP
        EXECUTE format('SELECT count(*) FROM %s t WHERE %s', v_table.rel, v_table.tenant_predicate)
            INTO v_count USING p_tenant_id;
        IF v_table.derived THEN
            v_derived := v_derived || jsonb_build_object(v_table.table_name, v_count);
        ELSE
            v_rows := v_rows || jsonb_build_object(v_table.table_name, v_count);
        END IF;
    END LOOP;
    RETURN jsonb_build_object('rows', v_rows, 'derived_rows', v_derived);
END
$$;


-- Dry run: what deprovisioning p_tenant_id would do. Reads only.
-- {tenant_exists, status, sendgrid_username, rows, derived_rows, open_job, completed_job}
CREATE FUNCTION deprovision_plan(p_tenant_id text) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = public, pg_temp
AS $$
DECLARE
    v_tenant tenants;
    v_open deprovision_jobs;
    v_completed deprovision_jobs;
    v_username text;
    v_counts jsonb;
BEGIN
    PERFORM deprovision_assert_tables();
    SELECT * INTO v_tenant FROM tenants WHERE id = p_tenant_id;
    IF NOT FOUND THEN
        SELECT * INTO v_completed FROM deprovision_jobs
        WHERE tenant_id = p_tenant_id AND state = 'COMPLETED'
        ORDER BY finished_at DESC LIMIT 1;
        RETURN jsonb_build_object(
            'tenant_exists', false,
            'completed_job', CASE WHEN v_completed.id IS NULL THEN NULL
                                  ELSE deprovision_job_document(v_completed) END);
    END IF;
    SELECT * INTO v_open FROM deprovision_jobs
    WHERE tenant_id = p_tenant_id AND state IN ('RUNNING', 'FAILED');
    IF v_open.id IS NOT NULL THEN
        v_username := v_open.sendgrid_username;
    ELSE
        SELECT sendgrid_username INTO v_username FROM tenant_settings WHERE tenant_id = p_tenant_id;
    END IF;
    v_counts := deprovision_count_rows(p_tenant_id);
    RETURN jsonb_build_object(
        'tenant_exists', true,
        'status', v_tenant.status,
        'sendgrid_username', v_username,
        'rows', v_counts -> 'rows',
        'derived_rows', v_counts -> 'derived_rows',
        'open_job', CASE WHEN v_open.id IS NULL THEN NULL
                         ELSE deprovision_job_document(v_open) END);
END
$$;


-- Start or resume the deprovisioning of p_tenant_id for request p_request_id.
-- Returns {disposition, job}:
--   recorded           the request's job, or the tenant's, is completed: its result
--   missing            no such tenant and no completed job for it
--   request_id_reused  p_request_id belongs to another tenant's job
--   claimed            this call now holds the job's lease (until p_lease_seconds
--                      from now); a new job also did step 1: the tenant is marked
--                      'deprovisioning' and its SendGrid subuser name captured.
-- Another call's live lease on the tenant's open job: SQLSTATE 55006 (ABORTED).
CREATE FUNCTION deprovision_claim(
    p_tenant_id text,
    p_request_id uuid,
    p_actor text,
    p_lease_owner uuid,
    p_lease_seconds double precision
) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    v_job deprovision_jobs;
    v_status text;
    v_username text;
BEGIN
    IF p_lease_seconds IS NULL OR p_lease_seconds <= 0 THEN
        RAISE EXCEPTION 'lease must be positive'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'INVALID_LEASE';
    END IF;

    SELECT j.* INTO v_job
    FROM deprovision_requests r JOIN deprovision_jobs j ON j.id = r.job_id
    WHERE r.request_id = p_request_id;
    IF FOUND THEN
        IF v_job.tenant_id <> p_tenant_id THEN
            RETURN jsonb_build_object('disposition', 'request_id_reused');
        END IF;
        IF v_job.state = 'COMPLETED' THEN
            RETURN jsonb_build_object('disposition', 'recorded',
                                      'job', deprovision_job_document(v_job));
        END IF;
    END IF;

    -- Serializes claims for one tenant, and waits for the transactions that
    -- wrote rows of it (their foreign key checks hold the row FOR KEY SHARE):
    -- once the status below commits, no write to the tenant can succeed
    -- (the write guard, 0006_tenant_write_guard.sql).
    SELECT status INTO v_status FROM tenants WHERE id = p_tenant_id FOR UPDATE;
    IF NOT FOUND THEN
        SELECT * INTO v_job FROM deprovision_jobs
        WHERE tenant_id = p_tenant_id AND state = 'COMPLETED'
        ORDER BY finished_at DESC LIMIT 1;
        IF FOUND THEN
            RETURN jsonb_build_object('disposition', 'recorded',
                                      'job', deprovision_job_document(v_job));
        END IF;
        RETURN jsonb_build_object('disposition', 'missing');
    END IF;

    SELECT * INTO v_job FROM deprovision_jobs
    WHERE tenant_id = p_tenant_id AND state IN ('RUNNING', 'FAILED')
    FOR UPDATE;
    IF FOUND THEN
        IF v_job.lease_owner IS NOT NULL AND v_job.lease_expires_at > clock_timestamp() THEN
            RAISE EXCEPTION 'tenant % is being deprovisioned by another call', p_tenant_id
                USING ERRCODE = 'object_in_use', HINT = 'DEPROVISION_IN_PROGRESS';
        END IF;
        UPDATE deprovision_jobs
        SET state = 'RUNNING',
            error = NULL,
            lease_owner = p_lease_owner,
            lease_expires_at = clock_timestamp() + make_interval(secs => p_lease_seconds),
            updated_at = clock_timestamp()
        WHERE id = v_job.id
        RETURNING * INTO v_job;
    ELSE
        PERFORM deprovision_assert_tables();
        SELECT sendgrid_username INTO v_username FROM tenant_settings WHERE tenant_id = p_tenant_id;
        -- Mirrors provisioning_svc/sendgrid_subusers.py: refuse before marking
        -- anything, rather than fail later at the SendGrid step.
        IF v_username IS NOT NULL AND v_username !~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$' THEN
            RAISE EXCEPTION 'the SendGrid subuser name of tenant % is malformed', p_tenant_id
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'INVALID_SENDGRID_USERNAME';
        END IF;
        UPDATE tenants SET status = 'deprovisioning' WHERE id = p_tenant_id;
        INSERT INTO deprovision_jobs
            (tenant_id, request_id, actor, sendgrid_username, lease_owner, lease_expires_at, steps)
        VALUES (
            p_tenant_id, p_request_id, p_actor, v_username, p_lease_owner,
            clock_timestamp() + make_interval(secs => p_lease_seconds),
            jsonb_build_object('MARK_TENANT', deprovision_step(
                'DONE',
                CASE WHEN v_status = 'deprovisioning'
                     THEN 'tenant was already marked deprovisioning'
                     ELSE 'tenant marked deprovisioning' END)))
        RETURNING * INTO v_job;
    END IF;

    -- The write guard's flag (0006_tenant_write_guard.sql) is up while the
    -- tenant is marked; raised again here for a job resumed after something
    -- lost it (a restore from a dump taken while a lowering ran).
    PERFORM tenant_write_guard_raise();
    INSERT INTO deprovision_requests (request_id, job_id, actor)
    VALUES (p_request_id, v_job.id, p_actor)
    ON CONFLICT (request_id) DO NOTHING;
    RETURN jsonb_build_object('disposition', 'claimed', 'job', deprovision_job_document(v_job));
END
$$;


-- Record that a step finished (DONE, ALREADY_ABSENT or SKIPPED).
CREATE FUNCTION deprovision_record_step(
    p_job_id uuid, p_lease_owner uuid, p_step text, p_outcome text, p_detail text
) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    v_job deprovision_jobs := deprovision_leased_job(p_job_id, p_lease_owner);
BEGIN
    IF p_step NOT IN ('SENDGRID_SUBUSER', 'CONFIG_DIRECTORY')
       OR p_outcome NOT IN ('DONE', 'ALREADY_ABSENT', 'SKIPPED') THEN
        RAISE EXCEPTION 'cannot record step % as %', p_step, p_outcome
            USING ERRCODE = 'invalid_parameter_value', HINT = 'INVALID_STEP';
    END IF;
    UPDATE deprovision_jobs
    SET steps = steps || jsonb_build_object(p_step, deprovision_step(p_outcome, p_detail)),
        updated_at = clock_timestamp()
    WHERE id = p_job_id
    RETURNING * INTO v_job;
    RETURN deprovision_job_document(v_job);
END
$$;


-- Step 3, one committed batch: delete up to p_batch_rows of the tenant's rows,
-- children before parents, and add the counts to the job in the same
-- transaction (so a cut deadline loses neither rows nor counts).
-- Returns {deleted: {table: n}, done, job}; done = nothing of the tenant is left.
-- The job's counts keep the tenant's data (rows) apart from ours (derived_rows).
--
-- Index scans only (enable_seqscan/enable_bitmapscan off inside): the tenant's
-- rows are a large share of a table, so the planner would pick a sequential
-- scan, which walks every earlier batch's dead tuples again (quadratic over a
-- large tenant). A plain index scan on the tenant_id-first key marks those
-- index entries dead as it passes them, and finds the live ones directly.
CREATE FUNCTION deprovision_delete_batch(p_job_id uuid, p_lease_owner uuid, p_batch_rows int)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = public, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
DECLARE
    v_job deprovision_jobs := deprovision_leased_job(p_job_id, p_lease_owner);
    v_table record;
    v_left bigint := p_batch_rows;
    v_count bigint;
    v_deleted jsonb := '{}';
    v_rows jsonb;
    v_derived jsonb;
    v_done boolean;
    v_seen jsonb := '{}';  -- table -> [derived, rows deleted], for each table visited
BEGIN
    IF p_batch_rows IS NULL OR p_batch_rows < 1 THEN
        RAISE EXCEPTION 'batch size must be positive'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'INVALID_BATCH_SIZE';
    END IF;
    PERFORM deprovision_assert_tables();
    FOR v_table IN SELECT * FROM deprovision_tables() ORDER BY delete_order, table_name LOOP
        EXIT WHEN v_left <= 0;
        IF v_table.self_referencing THEN
            -- Rows may reference each other: one statement, so that the
            -- foreign key is checked once all of them are gone.
            EXECUTE format('DELETE FROM %s t WHERE %s', v_table.rel, v_table.tenant_predicate)
                USING v_job.tenant_id;
        ELSE
            EXECUTE format(
                'DELETE FROM %1$s t WHERE %2$s AND ctid = ANY (ARRAY('
                'SELECT ctid FROM %1$s t WHERE %2$s LIMIT $2))',
                v_table.rel, v_table.tenant_predicate)
                USING v_job.tenant_id, v_left;
        END IF;
        GET DIAGNOSTICS v_count = ROW_COUNT;
        v_seen := v_seen || jsonb_build_object(
            v_table.table_name, jsonb_build_array(v_table.derived, v_count));
        IF v_count > 0 THEN
            v_deleted := v_deleted || jsonb_build_object(v_table.table_name, v_count);
            v_left := v_left - v_count;
        END IF;
    END LOOP;
    -- Each table gave fewer rows than it was asked for: all of them are empty
    -- (and all were visited).
    v_done := v_left > 0;

    -- This batch's counts, split; the finished step lists every table, 0 included.
    SELECT coalesce(jsonb_object_agg(t.key, t.n) FILTER (WHERE NOT t.derived), '{}'),
           coalesce(jsonb_object_agg(t.key, t.n) FILTER (WHERE t.derived), '{}')
    INTO v_rows, v_derived
    FROM (SELECT key, (value ->> 0)::boolean AS derived, value -> 1 AS n
          FROM jsonb_each(v_seen)) t
    WHERE v_done OR t.n <> '0';
    v_rows := deprovision_add_rows(v_job.steps -> 'TENANT_DATA' -> 'rows', v_rows);
    v_derived := deprovision_add_rows(v_job.steps -> 'TENANT_DATA' -> 'derived_rows', v_derived);

    UPDATE deprovision_jobs
    SET steps = steps || jsonb_build_object('TENANT_DATA', deprovision_step(
            CASE WHEN v_done THEN 'DONE' ELSE 'PENDING' END,
            deprovision_rows_detail(v_rows, v_derived, 'deleted')
                || CASE WHEN v_done THEN '' ELSE ' so far' END,
            v_rows, v_derived)),
        updated_at = clock_timestamp()
    WHERE id = p_job_id
    RETURNING * INTO v_job;
    RETURN jsonb_build_object('deleted', v_deleted, 'done', v_done,
                              'job', deprovision_job_document(v_job));
END
$$;


-- Step 5: delete the tenant row and complete the job (releases the lease).
-- Rows written for the tenant since step 3 despite the mark are swept first
-- (through the tenant_id index, not a scan of every table).
CREATE FUNCTION deprovision_finish(p_job_id uuid, p_lease_owner uuid) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = public, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
DECLARE
    v_job deprovision_jobs := deprovision_leased_job(p_job_id, p_lease_owner);
    v_step text;
    v_table record;
    v_count bigint;
    v_late jsonb := '{}';
    v_late_derived jsonb := '{}';
    v_data jsonb;
BEGIN
    FOREACH v_step IN ARRAY ARRAY['MARK_TENANT', 'SENDGRID_SUBUSER', 'TENANT_DATA', 'CONFIG_DIRECTORY'] LOOP
        IF coalesce(v_job.steps -> v_step ->> 'outcome', 'PENDING')
           NOT IN ('DONE', 'ALREADY_ABSENT', 'SKIPPED') THEN
            RAISE EXCEPTION 'step % of job % has not finished', v_step, p_job_id
                USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'STEP_NOT_FINISHED';
        END IF;
    END LOOP;
    PERFORM deprovision_assert_tables();
    FOR v_table IN SELECT * FROM deprovision_tables() ORDER BY delete_order, table_name LOOP
        EXECUTE format('DELETE FROM %s t WHERE %s', v_table.rel, v_table.tenant_predicate)
            USING v_job.tenant_id;
        GET DIAGNOSTICS v_count = ROW_COUNT;
        IF v_count > 0 AND v_table.derived THEN
            v_late_derived := v_late_derived || jsonb_build_object(v_table.table_name, v_count);
        ELSIF v_count > 0 THEN
            v_late := v_late || jsonb_build_object(v_table.table_name, v_count);
        END IF;
    END LOOP;
    v_data := v_job.steps -> 'TENANT_DATA';
    IF v_late <> '{}' OR v_late_derived <> '{}' THEN
        v_data := v_data || jsonb_build_object(
            'rows', deprovision_add_rows(v_data -> 'rows', v_late),
            'derived_rows', deprovision_add_rows(v_data -> 'derived_rows', v_late_derived),
            'detail', (v_data ->> 'detail') || ' (plus '
                || deprovision_rows_detail(v_late, v_late_derived,
                                           'written during deprovisioning, swept at the end)'));
    END IF;

    DELETE FROM tenants WHERE id = v_job.tenant_id;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    UPDATE deprovision_jobs
    SET steps = steps || jsonb_build_object(
            'TENANT_DATA', v_data,
            'TENANT_RECORD', deprovision_step('DONE', 'tenant row deleted; job completed',
                                              jsonb_build_object('tenants', v_count))),
        state = 'COMPLETED',
        lease_owner = NULL,
        lease_expires_at = NULL,
        updated_at = clock_timestamp(),
        finished_at = clock_timestamp()
    WHERE id = p_job_id
    RETURNING * INTO v_job;
    RETURN deprovision_job_document(v_job);
END
$$;


-- A step failed: record it, mark the job FAILED (resumable) and release the
-- lease so that a retry can start at once. A call that no longer holds the
-- lease changes nothing.
CREATE FUNCTION deprovision_fail(
    p_job_id uuid, p_lease_owner uuid, p_step text, p_reason text, p_detail text
) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    v_job deprovision_jobs;
BEGIN
    SELECT * INTO v_job FROM deprovision_jobs WHERE id = p_job_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'deprovisioning job % does not exist', p_job_id
            USING ERRCODE = 'no_data_found', HINT = 'JOB_NOT_FOUND';
    END IF;
    IF v_job.state <> 'RUNNING' OR v_job.lease_owner IS DISTINCT FROM p_lease_owner THEN
        RETURN deprovision_job_document(v_job);
    END IF;
    UPDATE deprovision_jobs
    SET steps = steps || jsonb_build_object(p_step,
            deprovision_step('FAILED', p_detail, steps -> p_step -> 'rows',
                             steps -> p_step -> 'derived_rows')),
        state = 'FAILED',
        error = p_reason,
        lease_owner = NULL,
        lease_expires_at = NULL,
        updated_at = clock_timestamp()
    WHERE id = p_job_id
    RETURNING * INTO v_job;
    RETURN deprovision_job_document(v_job);
END
$$;


-- Whichever order this and 0005_api_roles are applied in: the new table has
-- row-level security like every other, and no function is callable by PUBLIC
-- (0005 and its default privileges grant them to service_role).
ALTER TABLE deprovision_requests ENABLE ROW LEVEL SECURITY;
REVOKE EXECUTE ON FUNCTION
    deprovision_tables(),
    deprovision_assert_tables(),
    deprovision_step(text, text, jsonb, jsonb),
    deprovision_add_rows(jsonb, jsonb),
    deprovision_rows_detail(jsonb, jsonb, text),
    deprovision_job_document(deprovision_jobs),
    deprovision_leased_job(uuid, uuid),
    deprovision_count_rows(text),
    deprovision_plan(text),
    deprovision_claim(text, uuid, text, uuid, double precision),
    deprovision_record_step(uuid, uuid, text, text, text),
    deprovision_delete_batch(uuid, uuid, int),
    deprovision_finish(uuid, uuid),
    deprovision_fail(uuid, uuid, text, text, text)
FROM PUBLIC;
