"""The gRPC face of the CRM service: request in, one domain call, response out."""

from __future__ import annotations

from google.protobuf import timestamp_pb2
from grpc.aio import ServicerContext

from crm_svc.pipeline import Amount, PipelineSummary, pipeline_summary
from shared.database import Database
from shared.deadline import Deadline
from shared.money import to_money
from shared.proto_gen.crm.v1 import crm_pb2, crm_pb2_grpc
from shared.server import Service

SERVICE_NAME = crm_pb2.DESCRIPTOR.services_by_name["CrmService"].full_name
ERROR_DOMAIN = "crm.travel-agency.internal"


class CrmServicer(crm_pb2_grpc.CrmServiceServicer):
    def __init__(self, db: Database, default_deadline_s: float) -> None:
        self._db = db
        self._default_deadline_s = default_deadline_s

    async def PipelineSummary(
        self, request: crm_pb2.PipelineSummaryRequest, context: ServicerContext
    ) -> crm_pb2.PipelineSummaryResponse:
        deadline = Deadline.from_time_remaining(context.time_remaining(), self._default_deadline_s)
        summary = await pipeline_summary(self._db, request.tenant_id, deadline)
        return to_response(summary)


def crm_service(db: Database, default_deadline_s: float) -> Service:
    servicer = CrmServicer(db, default_deadline_s)
    return Service(
        SERVICE_NAME, lambda server: crm_pb2_grpc.add_CrmServiceServicer_to_server(servicer, server)
    )


def _money(amounts: tuple[Amount, ...]) -> list:
    return [to_money(a.currency, a.value) for a in amounts]


def to_response(summary: PipelineSummary) -> crm_pb2.PipelineSummaryResponse:
    computed_at = timestamp_pb2.Timestamp()
    computed_at.FromDatetime(summary.computed_at)
    return crm_pb2.PipelineSummaryResponse(
        tenant_id=summary.tenant_id,
        stages=[
            crm_pb2.StageSummary(
                stage=crm_pb2.PipelineStage.Value(f"PIPELINE_STAGE_{s.stage}"),
                client_count=s.client_count,
                value=_money(s.value),
                open=s.open,
            )
            for s in summary.stages
        ],
        total_clients=summary.total_clients,
        open_value=_money(summary.open_value),
        computed_at=computed_at,
    )
