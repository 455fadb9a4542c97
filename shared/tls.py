"""TLS for servers and clients: certificate, key and optional client CA.

With a client CA the server requires client certificates (mutual TLS).
Without any TLS files a server may only listen in plaintext on loopback,
unless ALLOW_INSECURE=1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from shared.errors import FailedPrecondition


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FailedPrecondition(
            f"cannot read {what} {path}: {exc.strerror}", reason="BAD_CONFIG"
        ) from None


@dataclass(frozen=True)
class ServerTls:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        pair = (_read(self.key_file, "TLS key"), _read(self.cert_file, "TLS certificate"))
        client_ca = _read(self.client_ca_file, "client CA") if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
        )


@dataclass(frozen=True)
class ClientTls:
    ca_file: Path | None = None  # None: the system's roots
    cert_file: Path | None = None  # for mutual TLS
    key_file: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "CA") if self.ca_file else None,
            private_key=_read(self.key_file, "client key") if self.key_file else None,
            certificate_chain=_read(self.cert_file, "client certificate")
            if self.cert_file
            else None,
        )
