"""The RPC being served, as the server boundary admitted it.

The boundary interceptor (shared/interceptors.py) sets it once per RPC, after
authenticating the caller: the method, the caller and the RPC's one
`Deadline` (the caller's, or the service's default when it set none).
Servicers read it once and pass the caller and the deadline down explicitly;
the log formatter reads the caller from here, and the client helpers
(shared/rpc_clients.py) read the deadline to pass what is left of it on.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from shared.auth import Caller
from shared.deadline import Deadline
from shared.errors import Internal


@dataclass(frozen=True)
class InboundRpc:
    method: str  # e.g. /crm.v1.CrmService/PipelineSummary
    caller: Caller
    deadline: Deadline


# Each RPC runs in a task of its own, with its own copy of the context.
INBOUND_RPC: ContextVar[InboundRpc | None] = ContextVar("inbound_rpc", default=None)


def inbound_rpc() -> InboundRpc:
    """The RPC being served; a servicer reached without the boundary is a bug."""
    rpc = INBOUND_RPC.get()
    if rpc is None:
        raise Internal("no inbound RPC: served outside the server boundary", reason="NO_BOUNDARY")
    return rpc


def inbound_deadline() -> Deadline | None:
    """The deadline of the RPC being served; None outside one (a script, a test)."""
    rpc = INBOUND_RPC.get()
    return rpc.deadline if rpc is not None else None


def inbound_caller_name() -> str:
    """For log lines: the authenticated caller, "-" before (or without) one."""
    rpc = INBOUND_RPC.get()
    return rpc.caller.name if rpc is not None else "-"
