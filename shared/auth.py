"""Who may call what: the methods' required scopes, and the callers.

`METHOD_ACCESS` is the one table of every method our servers answer and the
scope it requires (or that it is public); the server boundary enforces it for
every handler kind and refuses a method missing from it. The tenant
restriction depends on the request, so domain code checks it on the caller
it is handed (`Caller.require_tenant`).

The tokens file (AUTH_TOKENS_FILE, format in the README) lists callers with
the sha256 of their bearer token, their scopes and optionally the tenants
they may touch. Only hashes are on disk; tokens are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from shared.errors import FailedPrecondition, PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

SCOPE_PIPELINE_READ = "crm.pipeline.read"
SCOPE_TENANTS_DELETE = "provisioning.tenants.delete"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class MethodAccess:
    """Who may call a method: anyone, without a token (`PUBLIC`), or an
    authenticated caller holding `scope` (`requires(scope)`)."""

    scope: str | None

    @property
    def public(self) -> bool:
        return self.scope is None


PUBLIC = MethodAccess(scope=None)


def requires(scope: str) -> MethodAccess:
    return MethodAccess(scope=scope)


# Every method our servers answer, by full gRPC method name. A method missing
# here is refused (UNIMPLEMENTED), whatever the credential.
METHOD_ACCESS: Mapping[str, MethodAccess] = MappingProxyType(
    {
        "/crm.v1.CrmService/PipelineSummary": requires(SCOPE_PIPELINE_READ),
        "/provisioning.v1.ProvisioningService/Deprovision": requires(SCOPE_TENANTS_DELETE),
        # Load balancers, probes and grpcurl use these without a token.
        "/grpc.health.v1.Health/Check": PUBLIC,
        "/grpc.health.v1.Health/List": PUBLIC,
        "/grpc.health.v1.Health/Watch": PUBLIC,
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": PUBLIC,
        # Not served by the grpcio-reflection we pin; public if a later one adds it.
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": PUBLIC,
    }
)


@dataclass(frozen=True)
class Caller:
    name: str
    scopes: frozenset[str]
    tenants: frozenset[str] | None  # None: every tenant

    def require_scope(self, scope: str) -> None:
        if scope not in self.scopes:
            raise PermissionDenied(
                f"caller {self.name!r} lacks scope {scope}",
                reason="MISSING_SCOPE",
                metadata={"caller": self.name, "scope": scope},
            )

    def require_tenant(self, tenant_id: str) -> None:
        if self.tenants is not None and tenant_id not in self.tenants:
            raise PermissionDenied(
                f"caller {self.name!r} may not access this tenant",
                reason="TENANT_NOT_ALLOWED",
                metadata={"caller": self.name, "tenant_id": tenant_id},
            )


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    caller: Caller


class TokenRegistry:
    """The callers of a tokens file."""

    def __init__(self, entries: list[_Entry]) -> None:
        self._entries = entries

    @classmethod
    def load(cls, path: Path) -> TokenRegistry:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise FailedPrecondition(
                f"cannot read AUTH_TOKENS_FILE {path}: {exc.__class__.__name__}",
                reason="BAD_CONFIG",
            ) from None
        entries = []
        for i, raw in enumerate(data.get("callers", [])):
            digest = str(raw.get("token_sha256", "")).lower()
            name = raw.get("name")
            if not name or not _SHA256_HEX.fullmatch(digest):
                raise FailedPrecondition(
                    f"AUTH_TOKENS_FILE caller #{i + 1} needs a name and a 64-hex token_sha256",
                    reason="BAD_CONFIG",
                )
            tenants = raw.get("tenants")
            caller = Caller(
                name=str(name),
                scopes=frozenset(map(str, raw.get("scopes", []))),
                tenants=None if tenants is None else frozenset(map(str, tenants)),
            )
            entries.append(_Entry(bytes.fromhex(digest), caller))
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, token: str) -> Caller:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        # Compare against every entry, so timing does not tell which one matched.
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, digest):
                found = entry.caller
        if found is None:
            raise Unauthenticated("unknown credential", reason="INVALID_CREDENTIALS")
        return found


class TokenFile:
    """AUTH_TOKENS_FILE, re-read on demand (SIGHUP) without a restart.

    Calling it returns the current registry. A reload that fails keeps the
    previous callers, so a typo in the file does not lock everyone out.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._registry = TokenRegistry.load(path)

    def __call__(self) -> TokenRegistry:
        return self._registry

    def reload(self) -> bool:
        try:
            self._registry = TokenRegistry.load(self.path)
        except FailedPrecondition as exc:
            log.error("tokens file not reloaded, keeping the previous callers: %s", exc.message)
            return False
        log.info("tokens file reloaded: %d caller(s)", len(self._registry))
        return True
