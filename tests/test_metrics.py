"""The metrics endpoint counts what the services did, with the right labels."""

from __future__ import annotations

import grpc
import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.metrics import serve_metrics
from shared.proto_gen.crm.v1 import crm_pb2, crm_pb2_grpc
from tests.conftest import TOKEN_READER
from tests.factories import create_tenant, unique_tenant
from tests.rpc import bearer

METHOD = "/crm.v1.CrmService/PipelineSummary"


@pytest.fixture(scope="module")
def metrics_url() -> str:
    port = serve_metrics("127.0.0.1:0")
    return f"http://127.0.0.1:{port}/metrics"


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def test_metrics_count_rpcs_and_database_calls(
    metrics_url: str,
    crm_stub: crm_pb2_grpc.CrmServiceStub,
    sql: psycopg.Connection[object],
    transport: str,
) -> None:
    async with httpx.AsyncClient() as client:
        before = (await client.get(metrics_url)).text
        tenant = unique_tenant()
        create_tenant(sql, tenant)
        await crm_stub.PipelineSummary(
            crm_pb2.PipelineSummaryRequest(tenant_id=tenant),
            metadata=bearer(TOKEN_READER),
            timeout=5,
        )
        for bad in ("Bad!", "no-such-tenant-for-metrics"):
            with pytest.raises(grpc.aio.AioRpcError):
                await crm_stub.PipelineSummary(
                    crm_pb2.PipelineSummaryRequest(tenant_id=bad),
                    metadata=bearer(TOKEN_READER),
                    timeout=5,
                )
        after = (await client.get(metrics_url)).text

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("rpc_requests_total", method=METHOD, code="OK") == 1
    assert delta("rpc_requests_total", method=METHOD, code="INVALID_ARGUMENT") == 1
    assert delta("rpc_requests_total", method=METHOD, code="NOT_FOUND") == 1
    assert delta("rpc_duration_seconds_count", method=METHOD) == 3
    assert sample(after, "rpc_in_flight", method=METHOD) == 0
    db_name = "supabase-rest" if transport == "rest" else "postgres"
    assert (
        delta(
            "outbound_call_duration_seconds_count",
            transport=db_name,
            operation="pipeline_summary",
            outcome="ok",
        )
        == 1
    )
    assert (
        delta(
            "outbound_call_duration_seconds_count",
            transport=db_name,
            operation="pipeline_summary",
            outcome="NotFound",
        )
        == 1
    )
