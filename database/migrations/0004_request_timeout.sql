-- The caller's deadline, through PostgREST, into PostgreSQL.
--
-- PostgREST does not cancel a query when its HTTP client goes away, so the
-- REST transport sends what is left of its budget in the request header
-- `X-Statement-Timeout-Ms`; PostgREST runs this function before every request
-- (setting `db-pre-request = "public.apply_request_timeout"`), and it turns the
-- header into transaction-local statement and lock timeouts. Values that are
-- not a plain number of milliseconds, or above the role's own statement_timeout
-- (the cap set in 0005), are ignored: a caller can shorten, never lengthen.

CREATE FUNCTION apply_request_timeout() RETURNS void
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    v_header text;
    v_ms bigint;
    v_cap bigint;
BEGIN
    BEGIN
        v_header := nullif(current_setting('request.headers', true), '')::json
                    ->> 'x-statement-timeout-ms';
    EXCEPTION WHEN invalid_text_representation THEN
        RETURN;  -- unreadable headers: keep the role's timeout
    END;
    IF v_header IS NULL OR v_header !~ '^[0-9]{1,9}$' THEN
        RETURN;
    END IF;
    v_ms := v_header::bigint;
    -- statement_timeout is reported in milliseconds; 0 means no cap.
    SELECT setting::bigint INTO v_cap FROM pg_settings WHERE name = 'statement_timeout';
    IF v_ms < 1 OR (v_cap > 0 AND v_ms > v_cap) THEN
        RETURN;
    END IF;
    PERFORM set_config('statement_timeout', v_ms::text, true);
    PERFORM set_config('lock_timeout', v_ms::text, true);
END
$$;
