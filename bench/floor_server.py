"""The floor for PipelineSummary throughput: the least a server can do.

`python -m bench.floor_server` serves `crm.v1.CrmService/PipelineSummary`
(and health, so the benchmark can wait for it) on FLOOR_LISTEN with a plain
grpc.aio server and a psycopg_pool of DB_POOL_MAX connections (crm_svc's
default, 10) to DATABASE_URL: one `SELECT pipeline_summary(tenant)` per call,
its document turned straight into the response. No interceptors, auth,
deadlines, access log, metrics or error mapping: what crm_svc adds on top is
measured against this.

Directly it uses psycopg's defaults (server-side prepared statements after
five runs: the fastest way psycopg knows); through a transaction pooler those
break, so there it turns them off (`FLOOR_PREPARE=0`).

With `FLOOR_SHED=1` it is the floor for shedding instead: every
PipelineSummary is refused at once with RESOURCE_EXHAUSTED and a RetryInfo
(one status, built at start), no database at all, and gRPC core's
pending-request limit raised as crm_svc raises it, so that every call reaches
Python: how fast a grpc.aio server on this machine can answer calls it does
not serve.
"""

from __future__ import annotations

import asyncio
import os
from decimal import Decimal
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from google.type import money_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from psycopg_pool import AsyncConnectionPool

from shared.proto_gen.crm.v1 import crm_pb2, crm_pb2_grpc
from shared.server import CORE_MAX_PENDING_REQUESTS, CORE_MAX_PENDING_REQUESTS_HARD

NANOS = Decimal(1_000_000_000)


def money(item: dict[str, str]) -> money_pb2.Money:
    amount = Decimal(item["amount"])
    units = int(amount)
    return money_pb2.Money(
        currency_code=item["currency"], units=units, nanos=int((amount - units) * NANOS)
    )


def response(tenant_id: str, document: dict[str, Any]) -> crm_pb2.PipelineSummaryResponse:
    computed_at = timestamp_pb2.Timestamp()
    computed_at.FromJsonString(document["computed_at"])
    return crm_pb2.PipelineSummaryResponse(
        tenant_id=tenant_id,
        stages=[
            crm_pb2.StageSummary(
                stage=crm_pb2.PipelineStage.Value("PIPELINE_STAGE_" + s["stage"]),
                client_count=s["client_count"],
                value=[money(v) for v in s["value"]],
                open=s["open"],
            )
            for s in document["stages"]
        ],
        total_clients=document["total_clients"],
        open_value=[money(v) for v in document["open_value"]],
        computed_at=computed_at,
    )


class FloorServicer(crm_pb2_grpc.CrmServiceServicer):
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def PipelineSummary(
        self, request: crm_pb2.PipelineSummaryRequest, context: grpc.aio.ServicerContext
    ) -> crm_pb2.PipelineSummaryResponse:
        async with self._pool.connection() as conn:
            cursor = await conn.execute("SELECT pipeline_summary(%s)", (request.tenant_id,))
            row = await cursor.fetchone()
        assert row is not None
        return response(request.tenant_id, row[0])


class SheddingServicer(crm_pb2_grpc.CrmServiceServicer):
    """Refuses every call, as admission control refuses one, minus the deciding."""

    def __init__(self) -> None:
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=50_000_000))
        status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="server at capacity")
        status.details.add().Pack(retry)
        self._status = rpc_status.to_status(status)

    async def PipelineSummary(
        self, request: crm_pb2.PipelineSummaryRequest, context: grpc.aio.ServicerContext
    ) -> crm_pb2.PipelineSummaryResponse:
        await context.abort_with_status(self._status)
        raise AssertionError("abort_with_status returned")


async def serve(
    server: grpc.aio.Server, servicer: crm_pb2_grpc.CrmServiceServicer, name: str
) -> None:
    """Serve `servicer` and health on FLOOR_LISTEN until terminated; the bench
    reads the port from the line printed once started."""
    crm_pb2_grpc.add_CrmServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port(os.environ["FLOOR_LISTEN"])
    await server.start()
    print(f"{name} on port {port}", flush=True)
    await server.wait_for_termination()


async def serve_shedding() -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.server.max_pending_requests", CORE_MAX_PENDING_REQUESTS),
            ("grpc.server.max_pending_requests_hard_limit", CORE_MAX_PENDING_REQUESTS_HARD),
        ]
    )
    await serve(server, SheddingServicer(), "shedding floor server")


async def main() -> None:
    if os.environ.get("FLOOR_SHED") == "1":
        await serve_shedding()
        return
    prepare = os.environ.get("FLOOR_PREPARE", "1") != "0"
    pool = AsyncConnectionPool(
        os.environ["DATABASE_URL"],
        min_size=1,
        max_size=int(os.environ.get("DB_POOL_MAX") or 10),
        kwargs={"autocommit": True} | ({} if prepare else {"prepare_threshold": None}),
        open=False,
    )
    await pool.open(wait=True)
    try:
        await serve(grpc.aio.server(), FloorServicer(pool), "floor server")
    finally:
        await pool.close()


if __name__ == "__main__":
    asyncio.run(main())
