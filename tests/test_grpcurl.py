"""The README's grpcurl commands, run verbatim (token and port substituted)
with the real grpcurl binary against a real server holding the demo data."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devstack.examples import GRPCURL, crm_examples, provisioning_examples
from shared.auth import TokenRegistry
from shared.database.migrations import SEED_FILE
from tests.conftest import TOKEN_ADMIN, TOKEN_READER
from tests.factories import unique_tenant
from tests.provisioning_fixtures import (
    FakeReply,
    FakeSendGrid,
    make_config_directory,
    provisioning_server,
)

README = Path(__file__).resolve().parent.parent / "README.md"
README_ADDRESS = "127.0.0.1:50051"
README_PROVISIONING_ADDRESS = "127.0.0.1:50052"
GRPCURL_BINARY = str(Path(GRPCURL).resolve())


def readme_commands() -> list[list[str]]:
    lines = [
        line for line in README.read_text().splitlines() if line.startswith(".venv/bin/grpcurl ")
    ]
    return [shlex.split(line) for line in lines]


async def run(
    argv: list[str],
    address: str,
    *,
    token: str = TOKEN_READER,
    readme_address: str = README_ADDRESS,
    request_id: str = "",
) -> tuple[int, str, str]:
    argv = [GRPCURL_BINARY, *argv[1:]]
    argv = [
        address
        if a == readme_address
        else a.replace("$TOKEN", token).replace("$REQUEST_ID", request_id)
        for a in argv
    ]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture(scope="module")
def demo_data(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(SEED_FILE.read_text())


def test_readme_has_the_examples() -> None:
    methods = [argv[-1] for argv in readme_commands()]
    assert "list" in methods
    assert "crm.v1.CrmService/PipelineSummary" in methods
    assert methods.count("provisioning.v1.ProvisioningService/Deprovision") == 2


def test_make_run_prints_the_readme_commands() -> None:
    crm = [argv for _, argv in crm_examples("$TOKEN", README_ADDRESS)][:3]
    provisioning = [
        argv
        for _, argv in provisioning_examples("$TOKEN", README_PROVISIONING_ADDRESS, "$REQUEST_ID")
    ]
    printed = [[".venv/bin/grpcurl", *argv[1:]] for argv in crm + provisioning]
    assert printed == readme_commands()


async def test_list_shows_the_services(crm_address: str) -> None:
    (argv,) = [a for a in readme_commands() if a[-1] == "list"]
    code, out, err = await run(argv, crm_address)
    assert code == 0, err
    assert set(out.split()) == {
        "crm.v1.CrmService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_describe_shows_the_rpc(crm_address: str) -> None:
    (argv,) = [a for a in readme_commands() if "describe" in a]
    code, out, err = await run(argv, crm_address)
    assert code == 0, err
    assert re.search(
        r"rpc PipelineSummary \( \.crm\.v1\.PipelineSummaryRequest \) returns \( \.crm\.v1\.PipelineSummaryResponse \)",
        out,
    ), out


async def test_readme_summary_call_returns_the_demo_summary(
    crm_address: str, demo_data: None
) -> None:
    (argv,) = [a for a in readme_commands() if a[-1] == "crm.v1.CrmService/PipelineSummary"]
    code, out, err = await run(argv, crm_address)
    assert code == 0, err
    reply: dict[str, Any] = json.loads(out)
    assert reply["tenant_id"] == "acme-travel"
    stages = {s["stage"]: s for s in reply["stages"]}
    assert list(stages) == [
        "PIPELINE_STAGE_QUOTED",
        "PIPELINE_STAGE_NEGOTIATING",
        "PIPELINE_STAGE_BOOKED",
        "PIPELINE_STAGE_PAID",
        "PIPELINE_STAGE_TRAVELLED",
        "PIPELINE_STAGE_LOST",
    ]
    # grpcurl prints int64 as strings and omits zero fields.
    assert [s.get("client_count", "0") for s in stages.values()] == ["2", "2", "1", "1", "1", "1"]
    assert stages["PIPELINE_STAGE_QUOTED"]["value"] == [
        {"currency_code": "EUR", "units": "1200", "nanos": 500000000},
        {"currency_code": "USD", "units": "99", "nanos": 990000000},
    ]
    assert "value" not in stages["PIPELINE_STAGE_LOST"]
    assert reply["total_clients"] == "8"
    assert reply["open_value"] == [
        {"currency_code": "EUR", "units": "5300", "nanos": 700000000},
        {"currency_code": "USD", "units": "99", "nanos": 990000000},
    ]


async def test_grpcurl_shows_the_rich_error(crm_address: str) -> None:
    (argv,) = [a for a in readme_commands() if a[-1] == "crm.v1.CrmService/PipelineSummary"]
    argv = [a.replace("acme-travel", "../etc") for a in argv]
    code, out, err = await run(argv, crm_address)
    assert code != 0
    assert "Code: InvalidArgument" in err
    assert "INVALID_TENANT_ID" in err
    assert TOKEN_READER not in err + out


def readme_deprovision_commands() -> tuple[list[str], list[str]]:
    dry, real = [a for a in readme_commands() if a[-1].endswith("/Deprovision")]
    return dry, real


async def test_readme_deprovision_commands_dry_run_then_real(
    database: Any,
    tokens: TokenRegistry,
    sendgrid: FakeSendGrid,
    tmp_path: Path,
    sql: Any,
) -> None:
    dry, real = readme_deprovision_commands()
    # The seed brings back demo tenants an earlier run deprovisioned (as `make run` does).
    sql.execute(SEED_FILE.read_text())
    # As under `make run`: dev mode, no SendGrid key, demo directories.
    async with provisioning_server(
        database, tokens, sendgrid, tmp_path, sendgrid_api_key=None, dev_mode=True
    ) as provisioning:
        make_config_directory(provisioning.tenant_config_root / "initech-voyages")
        address = provisioning.address
        kwargs: dict[str, Any] = {
            "token": TOKEN_ADMIN,
            "readme_address": README_PROVISIONING_ADDRESS,
            "request_id": str(uuid.uuid4()),
        }

        code, out, err = await run(dry, address, **kwargs)
        assert code == 0, err
        plan = json.loads(out)
        assert plan["state"] == "JOB_STATE_VALIDATED"
        steps = {s["step"]: s for s in plan["steps"]}
        assert steps["STEP_TENANT_DATA"]["outcome"] == "STEP_OUTCOME_WOULD_DELETE"
        # The seed's initech-voyages: 2 clients, 2 quotes, an activity per client;
        # apart from them, their pipeline aggregates (the seed compacts its deltas):
        # 2 stages, each with a GBP value; nothing left in the delta log.
        data = steps["STEP_TENANT_DATA"]
        assert data["rows"] == {
            "activities": "2",
            "clients": "2",
            "invoices": "0",
            "notifications": "1",
            "quotes": "2",
            "tenant_settings": "1",
        }
        assert data["derived_rows"] == {
            "pipeline_deltas": "0",
            "pipeline_stage_clients": "2",
            "pipeline_stage_values": "2",
        }
        # The tenant's data reads first.
        assert list(data) == ["step", "outcome", "detail", "rows", "derived_rows"]
        assert data["detail"] == "would delete 8 rows of the tenant's data and 4 derived rows"
        assert (provisioning.tenant_config_root / "initech-voyages").is_dir()

        code, out, err = await run(real, address, **kwargs)
        assert code == 0, err
        done = json.loads(out)
        assert done["state"] == "JOB_STATE_COMPLETED"
        assert not (provisioning.tenant_config_root / "initech-voyages").exists()
        steps = {s["step"]: s["outcome"] for s in done["steps"]}
        assert steps["STEP_SENDGRID_SUBUSER"] == "STEP_OUTCOME_ALREADY_ABSENT"

        code, again, err = await run(real, address, **kwargs)
        assert code == 0, err
        assert json.loads(again) == done


async def test_grpcurl_shows_the_partial_response_of_a_failed_deprovision(
    database: Any, tokens: TokenRegistry, sendgrid: FakeSendGrid, tmp_path: Path, sql: Any
) -> None:
    tenant = unique_tenant("grpcurl")
    sql.execute("INSERT INTO tenants (id) VALUES (%s)", (tenant,))
    sql.execute(
        "INSERT INTO tenant_settings (tenant_id, sendgrid_username) VALUES (%s, 'x-mail')",
        (tenant,),
    )
    sendgrid.script(FakeReply(500))
    _, real = readme_deprovision_commands()
    real = [a.replace("initech-voyages", tenant) for a in real]
    async with provisioning_server(database, tokens, sendgrid, tmp_path) as provisioning:
        address = provisioning.address
        code, out, err = await run(
            real,
            address,
            token=TOKEN_ADMIN,
            readme_address=README_PROVISIONING_ADDRESS,
            request_id=str(uuid.uuid4()),
        )
    assert code != 0
    assert "Code: Unavailable" in err
    assert "SENDGRID_UNAVAILABLE" in err
    assert "provisioning.v1.DeprovisionResponse" in err
    assert "STEP_OUTCOME_FAILED" in err
    assert TOKEN_ADMIN not in out + err
