"""What the dev stack (`make run`), the tests and the benchmarks share.

- `tokens`: writing an AUTH_TOKENS_FILE for callers whose tokens we hold;
- `databases`: creating, migrating and dropping a database on a server;
- `processes`: starting `python -m crm_svc` / `provisioning_svc` and waiting
  until health says SERVING;
- `pooler` and `postgrest_standin`: a real PgBouncer and a PostgREST-protocol
  server, standing in for Supabase's transaction pooler and REST API.

None of it runs inside a service.
"""
