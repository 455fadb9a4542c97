"""Prometheus metrics of a service, served on its own HTTP port.

`*_METRICS_LISTEN` (e.g. 127.0.0.1:9464) turns the endpoint on; unset, the
metrics are still counted but not exposed.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPCS = Counter("rpc_requests", "RPCs handled, by method and final status code", ["method", "code"])
RPC_SECONDS = Histogram(
    "rpc_duration_seconds",
    "RPC latency",
    ["method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
RPCS_IN_FLIGHT = Gauge("rpc_in_flight", "RPCs being handled", ["method"])
# Admission control (shared/admission.py): refused calls, and each limit's state.
RPCS_SHED = Counter(
    "rpc_shed",
    "RPCs refused by admission control (RESOURCE_EXHAUSTED), by method and reason",
    ["method", "reason"],
)
ADMISSION_IN_FLIGHT = Gauge(
    "admission_in_flight", "Calls holding a slot of a concurrency limit", ["limit"]
)
ADMISSION_QUEUED = Gauge(
    "admission_queued", "Calls waiting for a slot of a concurrency limit", ["limit"]
)
EVENT_LOOP_LAG = Gauge(
    "event_loop_lag_seconds",
    "How late the health watcher's last wake-up was: time the event loop could not run",
)
CALL_SECONDS = Histogram(
    "outbound_call_duration_seconds",
    "Database and SendGrid call latency, by transport, operation and outcome",
    ["transport", "operation", "outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DEADLINE_EXHAUSTED = Counter(
    "deadline_exhausted", "Operations refused or cut because the deadline ran out", ["operation"]
)
SENDGRID_CALLS = Counter("sendgrid_calls", "SendGrid API calls, by outcome", ["outcome"])
LOG_LINES_DROPPED = Counter(
    "log_lines_dropped",
    "Log lines dropped because the log output could not keep up (shared/logs.py)",
)
DEPROVISION_JOBS = Counter(
    "deprovision_jobs", "Deprovision calls, by resulting job state", ["state"]
)

# The CRM service's background compaction of the pipeline delta log. Its
# database calls are in outbound_call_duration_seconds{operation="pipeline_compact"}.
PIPELINE_DELTAS_COMPACTED = Counter(
    "pipeline_deltas_compacted", "Pipeline deltas folded into the aggregates"
)
PIPELINE_COMPACTION_ERRORS = Counter(
    "pipeline_compaction_errors", "Failed pipeline compaction calls, by reason", ["reason"]
)
PIPELINE_REBUILDS = Counter(
    "pipeline_rebuilds",
    "Tenant rebuilds the compactor attempted, by outcome (rebuilt, busy, not_needed, failed)",
    ["outcome"],
)
# Counted every few seconds by the compactor: alert on a backlog that keeps growing.
PIPELINE_BACKLOG_TOTAL = Gauge("pipeline_backlog_pending_deltas", "Pending pipeline deltas in all")
PIPELINE_BACKLOG_DELTAS = Gauge(
    "pipeline_backlog_tenant_deltas",
    "Pending pipeline deltas of the tenants with the largest backlogs (the top 10 only)",
    ["tenant"],
)
PIPELINE_COMPACTION_LAST_SUCCESS = Gauge(
    "pipeline_compaction_last_success_timestamp_seconds",
    "Unix time of the last successful pipeline compaction call (alert when it stops moving)",
)


def serve_metrics(listen: str | None) -> int | None:
    """Expose /metrics on `host:port` (in a daemon thread) when configured.

    Returns the bound port (useful with port 0), or None when off.
    """
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1")
    return int(server.server_address[1])
