-- Demo tenants for `make run`. Seeds a tenant only when it does not exist,
-- so running it again (or after a demo deprovision) is safe. One transaction:
-- the temp tables below live until COMMIT (psql or psycopg alike).

BEGIN;

CREATE TEMP TABLE demo_tenants (id text, name text, currency char(3), sendgrid text) ON COMMIT DROP;
INSERT INTO demo_tenants VALUES
    ('acme-travel', 'Acme Travel', 'EUR', 'acme-travel-mail'),
    ('globex-tours', 'Globex Tours', 'USD', 'globex-tours-mail'),
    ('initech-voyages', 'Initech Voyages', 'GBP', NULL);

CREATE TEMP TABLE new_tenants ON COMMIT DROP AS
SELECT d.* FROM demo_tenants d WHERE NOT EXISTS (SELECT 1 FROM tenants t WHERE t.id = d.id);

INSERT INTO tenants (id, name, default_currency)
SELECT id, name, currency FROM new_tenants;
INSERT INTO tenant_settings (tenant_id, sendgrid_username)
SELECT id, sendgrid FROM new_tenants;

-- acme-travel: mixed-case and padded emails, two currencies, a NULL price,
-- a client with no quotes, a quote with no client, two clients sharing an email.
INSERT INTO clients (tenant_id, email, name, pipeline_stage)
SELECT 'acme-travel', e, n, s FROM (VALUES
    ('Ada@Example.com', 'Ada Lovelace', 'QUOTED'),
    ('  grace@example.com ', 'Grace Hopper', 'NEGOTIATING'),
    ('linus@example.com', 'Linus T.', 'BOOKED'),
    ('LINUS@example.com', 'Linus (second profile)', 'PAID'),
    ('margaret@example.com', 'Margaret Hamilton', 'TRAVELLED'),
    (NULL, 'Walk-in, no email', 'QUOTED'),
    ('', 'Blank email', 'LOST'),
    ('noquotes@example.com', 'No quotes yet', 'NEGOTIATING')
) AS v (e, n, s)
WHERE EXISTS (SELECT 1 FROM new_tenants WHERE id = 'acme-travel');

INSERT INTO quotes (tenant_id, customer_email, total_price, currency)
SELECT 'acme-travel', e, p, c FROM (VALUES
    ('ada@example.com', 1200.50::numeric, 'EUR'),
    ('ADA@EXAMPLE.COM  ', 99.99, 'USD'),
    ('grace@example.com', 2500.00, 'EUR'),
    ('grace@example.com', NULL, 'EUR'),
    ('linus@example.com', 800.10, 'EUR'),
    ('margaret@example.com', 4300.00, 'EUR'),
    ('stranger@example.com', 10000.00, 'EUR'),
    (NULL, 50.00, 'EUR'),
    ('', 75.00, 'EUR')
) AS v (e, p, c)
WHERE EXISTS (SELECT 1 FROM new_tenants WHERE id = 'acme-travel');

-- globex-tours: USD and JPY, more clients per stage.
INSERT INTO clients (tenant_id, email, name, pipeline_stage)
SELECT 'globex-tours', format('guest%s@globex.example', g), format('Guest %s', g),
       (ARRAY['QUOTED', 'NEGOTIATING', 'BOOKED', 'PAID', 'TRAVELLED', 'LOST'])[1 + g % 6]
FROM generate_series(1, 24) AS g
WHERE EXISTS (SELECT 1 FROM new_tenants WHERE id = 'globex-tours');

INSERT INTO quotes (tenant_id, customer_email, total_price, currency)
SELECT 'globex-tours', format(' Guest%s@Globex.Example', g), (g * 137.25)::numeric(14, 2),
       CASE WHEN g % 4 = 0 THEN 'JPY' ELSE 'USD' END
FROM generate_series(1, 30) AS g
WHERE EXISTS (SELECT 1 FROM new_tenants WHERE id = 'globex-tours');

-- initech-voyages: a small GBP tenant with no SendGrid subuser.
INSERT INTO clients (tenant_id, email, name, pipeline_stage)
SELECT 'initech-voyages', e, n, s FROM (VALUES
    ('peter@initech.example', 'Peter Gibbons', 'BOOKED'),
    ('milton@initech.example', 'Milton Waddams', 'LOST')
) AS v (e, n, s)
WHERE EXISTS (SELECT 1 FROM new_tenants WHERE id = 'initech-voyages');

INSERT INTO quotes (tenant_id, customer_email, total_price, currency)
SELECT 'initech-voyages', e, p, 'GBP' FROM (VALUES
    ('Peter@Initech.example', 640.00::numeric),
    ('milton@initech.example', 15.75)
) AS v (e, p)
WHERE EXISTS (SELECT 1 FROM new_tenants WHERE id = 'initech-voyages');

INSERT INTO activities (tenant_id, client_id, kind)
SELECT c.tenant_id, c.id, 'created' FROM clients c
JOIN new_tenants n ON n.id = c.tenant_id;

INSERT INTO notifications (tenant_id, message)
SELECT id, 'Welcome to the CRM' FROM new_tenants;

-- Fold the demo rows' deltas into the pipeline aggregates now, as the CRM
-- service's compactor would shortly after: the demo starts compacted.
SELECT pipeline_compact(100000);

COMMIT;
