"""TLS and mutual TLS on the real server; plaintext only on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crm_svc.servicer import ERROR_DOMAIN, crm_service
from shared.auth import TokenRegistry
from shared.database import Database
from shared.errors import FailedPrecondition
from shared.server import ServerHandle, create_server
from shared.settings import Settings
from shared.tls import ClientTls, ServerTls
from tests.certificates import CertificateAuthority, Issued


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    other_ca: CertificateAuthority
    server: Issued
    client: Issued
    stranger: Issued  # a client certificate from another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory)
    other_ca = CertificateAuthority(directory, "Other CA")
    return Pki(
        ca=ca,
        other_ca=other_ca,
        server=ca.issue("server", server=True),
        client=ca.issue("client", server=False),
        stranger=other_ca.issue("stranger", server=False),
    )


async def start(database: Database, tokens: TokenRegistry, tls: ServerTls) -> ServerHandle:
    handle = create_server(
        "127.0.0.1:0",
        [crm_service(database, 10.0)],
        tokens=lambda: tokens,
        error_domain=ERROR_DOMAIN,
        tls=tls,
    )
    await handle.start()
    return handle


async def healthy(port: int, credentials: grpc.ChannelCredentials) -> bool:
    async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=3
            )
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest_asyncio.fixture
async def tls_server(
    database: Database, tokens: TokenRegistry, pki: Pki
) -> AsyncIterator[ServerHandle]:
    handle = await start(database, tokens, ServerTls(pki.server.cert, pki.server.key))
    yield handle
    await handle.stop(0)


@pytest_asyncio.fixture
async def mtls_server(
    database: Database, tokens: TokenRegistry, pki: Pki
) -> AsyncIterator[ServerHandle]:
    tls = ServerTls(pki.server.cert, pki.server.key, pki.ca.issued.cert)
    handle = await start(database, tokens, tls)
    yield handle
    await handle.stop(0)


async def test_tls_works_with_the_ca(tls_server: ServerHandle, pki: Pki) -> None:
    assert await healthy(tls_server.port, ClientTls(pki.ca.issued.cert).credentials())


async def test_client_without_the_ca_is_refused(tls_server: ServerHandle, pki: Pki) -> None:
    assert not await healthy(tls_server.port, ClientTls(pki.other_ca.issued.cert).credentials())


async def test_plaintext_client_gets_nothing_from_a_tls_server(tls_server: ServerHandle) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tls_server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=3
            )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_rejects_a_client_without_a_certificate(
    mtls_server: ServerHandle, pki: Pki
) -> None:
    ca = pki.ca.issued.cert
    assert not await healthy(mtls_server.port, ClientTls(ca).credentials())
    foreign = ClientTls(ca, pki.stranger.cert, pki.stranger.key)
    assert not await healthy(mtls_server.port, foreign.credentials())
    good = ClientTls(ca, pki.client.cert, pki.client.key)
    assert await healthy(mtls_server.port, good.credentials())


def test_plaintext_on_a_public_address_is_refused(
    database: Database, tokens: TokenRegistry
) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        create_server("0.0.0.0:0", [], tokens=lambda: tokens, error_domain=ERROR_DOMAIN)
    assert caught.value.reason == "INSECURE_LISTEN"


async def test_allow_insecure_permits_it(tokens: TokenRegistry) -> None:
    handle = create_server(
        "0.0.0.0:0", [], tokens=lambda: tokens, error_domain=ERROR_DOMAIN, allow_insecure=True
    )
    assert handle.port > 0
    await handle.server.stop(0)


def test_tls_settings_need_both_files(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition):
        _ = Settings.from_env({"TLS_CERT_FILE": str(tmp_path / "c.pem")}).server_tls
    assert Settings.from_env({}).server_tls is None
