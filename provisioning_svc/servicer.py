"""The gRPC face of the provisioning service: request in, one domain call, response out."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2
from grpc.aio import ServicerContext

from provisioning_svc.config_directories import ConfigDirectories
from provisioning_svc.deprovision import (
    DEFAULT_MAX_BATCH_ROWS,
    Deprovisioner,
    DeprovisionRequest,
    DeprovisionResult,
)
from provisioning_svc.sendgrid_subusers import SendGridSubusers
from shared.database import Database
from shared.errors import ServiceError
from shared.inbound_rpc import inbound_rpc
from shared.proto_gen.provisioning.v1 import provisioning_pb2, provisioning_pb2_grpc
from shared.server import Service
from shared.settings import Settings

SERVICE_NAME = provisioning_pb2.DESCRIPTOR.services_by_name["ProvisioningService"].full_name
ERROR_DOMAIN = "provisioning.travel-agency.internal"


class ProvisioningServicer(provisioning_pb2_grpc.ProvisioningServiceServicer):
    def __init__(self, deprovisioner: Deprovisioner) -> None:
        self._deprovisioner = deprovisioner

    async def Deprovision(
        self, request: provisioning_pb2.DeprovisionRequest, context: ServicerContext
    ) -> provisioning_pb2.DeprovisionResponse:
        rpc = inbound_rpc()
        try:
            result = await self._deprovisioner.deprovision(
                DeprovisionRequest(
                    tenant_id=request.tenant_id,
                    request_id=request.request_id,
                    validate_only=request.validate_only,
                    allow_missing=request.allow_missing,
                ),
                rpc.caller,
                rpc.deadline,
            )
        except ServiceError as error:
            # A failed step carries the partial result: it travels as a status detail.
            error.details = [
                to_response(d) if isinstance(d, DeprovisionResult) else d for d in error.details
            ]
            raise
        return to_response(result)


def provisioning_service(
    db: Database, settings: Settings, *, max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS
) -> Service:
    deprovisioner = Deprovisioner(
        db,
        SendGridSubusers(
            settings.sendgrid_api_key,
            settings.sendgrid_api_host,
            dev_mode=settings.dev_mode,
            slow_call_ms=settings.slow_call_ms,
        ),
        ConfigDirectories(settings.tenant_config_root),
        max_batch_rows=max_batch_rows,
    )
    servicer = ProvisioningServicer(deprovisioner)
    return Service(
        SERVICE_NAME,
        lambda server: provisioning_pb2_grpc.add_ProvisioningServiceServicer_to_server(
            servicer, server
        ),
        settings.provisioning_default_deadline_s,
    )


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def to_response(result: DeprovisionResult) -> provisioning_pb2.DeprovisionResponse:
    return provisioning_pb2.DeprovisionResponse(
        tenant_id=result.tenant_id,
        job_id=result.job_id,
        state=provisioning_pb2.JobState.Value(f"JOB_STATE_{result.state.value}"),
        validate_only=result.validate_only,
        steps=[
            provisioning_pb2.StepResult(
                step=provisioning_pb2.Step.Value(f"STEP_{s.step.value}"),
                outcome=provisioning_pb2.StepOutcome.Value(f"STEP_OUTCOME_{s.outcome.value}"),
                detail=s.detail,
                rows=dict(s.rows),
                derived_rows=dict(s.derived_rows),
            )
            for s in result.steps
        ],
        started_at=_timestamp(result.started_at),
        finished_at=_timestamp(result.finished_at),
    )
