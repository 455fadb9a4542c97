"""The README's grpcurl commands, run verbatim (token and port substituted)
with the real grpcurl binary against a real server holding the demo data."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devstack.examples import GRPCURL, crm_examples
from shared.database.migrations import SEED_FILE
from tests.conftest import TOKEN_READER

README = Path(__file__).resolve().parent.parent / "README.md"
README_ADDRESS = "127.0.0.1:50051"
GRPCURL_BINARY = str(Path(GRPCURL).resolve())


def readme_commands() -> list[list[str]]:
    lines = [
        line for line in README.read_text().splitlines() if line.startswith(".venv/bin/grpcurl ")
    ]
    return [shlex.split(line) for line in lines]


async def run(argv: list[str], address: str) -> tuple[int, str, str]:
    argv = [GRPCURL_BINARY, *argv[1:]]
    argv = [address if a == README_ADDRESS else a.replace("$TOKEN", TOKEN_READER) for a in argv]
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


def test_make_run_prints_the_readme_commands() -> None:
    printed = [argv for _, argv in crm_examples("$TOKEN", README_ADDRESS)]
    assert [[".venv/bin/grpcurl", *argv[1:]] for argv in printed][:3] == readme_commands()


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
