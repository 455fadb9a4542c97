"""The grpcurl commands `make run` prints (and the tests run verbatim)."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

_BINARY = Path(sys.executable).parent / "grpcurl"
# Relative when run from the repository (as `make run` does), so the printed
# commands read exactly like the README's.
GRPCURL = os.path.relpath(_BINARY) if _BINARY.is_relative_to(Path.cwd()) else str(_BINARY)


def grpcurl(token: str, address: str, method: str, body: dict[str, object]) -> list[str]:
    return [
        GRPCURL,
        "-plaintext",
        "-max-time",
        "5",
        "-H",
        f"authorization: Bearer {token}",
        "-d",
        json.dumps(body),
        address,
        method,
    ]


def crm_examples(token: str, crm_address: str) -> list[tuple[str, list[str]]]:
    return [
        (
            "List the services (reflection, no token needed)",
            [GRPCURL, "-plaintext", crm_address, "list"],
        ),
        (
            "Describe the service",
            [GRPCURL, "-plaintext", crm_address, "describe", "crm.v1.CrmService"],
        ),
        (
            "Pipeline summary of acme-travel",
            grpcurl(
                token,
                crm_address,
                "crm.v1.CrmService/PipelineSummary",
                {"tenant_id": "acme-travel"},
            ),
        ),
        (
            "Pipeline summary of globex-tours",
            grpcurl(
                token,
                crm_address,
                "crm.v1.CrmService/PipelineSummary",
                {"tenant_id": "globex-tours"},
            ),
        ),
    ]


DEPROVISION = "provisioning.v1.ProvisioningService/Deprovision"
# The demo tenant the printed deprovision commands remove (`make run` seeds it again).
DEPROVISION_DEMO_TENANT = "initech-voyages"


def provisioning_examples(
    token: str, provisioning_address: str, request_id: str
) -> list[tuple[str, list[str]]]:
    return [
        (
            f"Dry run: what deprovisioning {DEPROVISION_DEMO_TENANT} would delete (changes nothing)",
            grpcurl(
                token,
                provisioning_address,
                DEPROVISION,
                {"tenant_id": DEPROVISION_DEMO_TENANT, "validate_only": True},
            ),
        ),
        (
            f"Deprovision {DEPROVISION_DEMO_TENANT} for real (repeat it: same recorded result)",
            grpcurl(
                token,
                provisioning_address,
                DEPROVISION,
                {"tenant_id": DEPROVISION_DEMO_TENANT, "request_id": request_id},
            ),
        ),
    ]


def render(examples: list[tuple[str, list[str]]]) -> str:
    return "\n".join(f"# {title}\n{shlex.join(argv)}\n" for title, argv in examples)
