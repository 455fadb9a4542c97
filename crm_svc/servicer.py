"""The gRPC face of the CRM service: request in, one domain call, response out."""

from __future__ import annotations

from grpc.aio import ServicerContext

from crm_svc.pipeline import PipelineSummary, pipeline_summary
from shared.database import Database
from shared.inbound_rpc import inbound_rpc
from shared.money import add_money
from shared.proto_gen.crm.v1 import crm_pb2, crm_pb2_grpc
from shared.server import Service

SERVICE_NAME = crm_pb2.DESCRIPTOR.services_by_name["CrmService"].full_name
ERROR_DOMAIN = "crm.travel-agency.internal"


class CrmServicer(crm_pb2_grpc.CrmServiceServicer):
    def __init__(self, db: Database) -> None:
        self._db = db

    async def PipelineSummary(
        self, request: crm_pb2.PipelineSummaryRequest, context: ServicerContext
    ) -> crm_pb2.PipelineSummaryResponse:
        rpc = inbound_rpc()
        summary = await pipeline_summary(self._db, rpc.caller, request.tenant_id, rpc.deadline)
        return to_response(summary)


def crm_service(db: Database, default_deadline_s: float) -> Service:
    """The CRM service; `default_deadline_s` applies when a caller sets no deadline."""
    servicer = CrmServicer(db)
    return Service(
        SERVICE_NAME,
        lambda server: crm_pb2_grpc.add_CrmServiceServicer_to_server(servicer, server),
        default_deadline_s,
    )


_STAGE_VALUES = {
    name.removeprefix("PIPELINE_STAGE_"): number for name, number in crm_pb2.PipelineStage.items()
}


def to_response(summary: PipelineSummary) -> crm_pb2.PipelineSummaryResponse:
    # Built in place: assigning lists of messages would copy each one.
    response = crm_pb2.PipelineSummaryResponse(
        tenant_id=summary.tenant_id, total_clients=summary.total_clients
    )
    for s in summary.stages:
        stage = response.stages.add(
            stage=_STAGE_VALUES[s.stage], client_count=s.client_count, open=s.open
        )
        add_money(stage.value, s.value)
    add_money(response.open_value, summary.open_value)
    response.computed_at.FromDatetime(summary.computed_at)
    return response
