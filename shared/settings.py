"""Configuration from the environment (README, "Configuration"), with safe defaults."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.admission import Admission
from shared.errors import FailedPrecondition
from shared.tls import ServerTls


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise FailedPrecondition(
            f"{name} must be a number of seconds", reason="BAD_CONFIG"
        ) from None
    if not 0 < value <= 3600:
        raise FailedPrecondition(f"{name} must be in (0, 3600]", reason="BAD_CONFIG")
    return value


def _interval_or_off(env: Mapping[str, str], name: str, default: float) -> float:
    """Seconds between runs of a background job; 0 turns the job off. Below
    10 ms it would poll the database in a busy loop: refused."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise FailedPrecondition(
            f"{name} must be a number of seconds (0 turns it off)", reason="BAD_CONFIG"
        ) from None
    if not (value == 0 or 0.01 <= value <= 3600):
        raise FailedPrecondition(f"{name} must be 0 (off) or in [0.01, 3600]", reason="BAD_CONFIG")
    return value


def _count(env: Mapping[str, str], name: str, default: int, *, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise FailedPrecondition(f"{name} must be a whole number", reason="BAD_CONFIG") from None
    if not low <= value <= high:
        raise FailedPrecondition(f"{name} must be in [{low}, {high}]", reason="BAD_CONFIG")
    return value


def _optional_count(env: Mapping[str, str], name: str, *, low: int, high: int) -> int | None:
    """A whole number, or None when unset (a default derived elsewhere applies)."""
    if not (env.get(name) or "").strip():
        return None
    return _count(env, name, low, low=low, high=high)


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    supabase_url: str | None = None
    # repr=False: settings get logged; keys must not be.
    supabase_service_role_key: str | None = field(default=None, repr=False)
    data_dir: Path = Path(".data")
    crm_listen: str = "127.0.0.1:50051"
    provisioning_listen: str = "127.0.0.1:50052"
    crm_metrics_listen: str | None = None
    provisioning_metrics_listen: str | None = None
    auth_tokens_file: Path | None = None
    sendgrid_api_key: str | None = field(default=None, repr=False)
    sendgrid_api_host: str = "https://api.sendgrid.com"
    # CLIENTS_DIR: one configuration directory per tenant (not the `clients` table).
    tenant_config_root: Path = Path("clients")
    crm_default_deadline_s: float = 10.0
    provisioning_default_deadline_s: float = 60.0
    slow_call_ms: int = 3000
    db_pool_min: int = 1
    db_pool_max: int = 10
    # Admission control (shared/admission.py): calls running at once (None: twice
    # db_pool_max), calls queued behind them (None: 25 per running slot), and
    # Deprovision's own bound.
    admission_max_in_flight: int | None = None
    admission_max_queued: int | None = None
    deprovision_max_in_flight: int = 2
    dev_mode: bool = False
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    allow_insecure: bool = False
    # The CRM service's background compaction of the pipeline delta log
    # (crm_svc/compaction.py): pause between calls when caught up (0 = off),
    # deltas per call, the time one call may take, and the time one tenant's
    # rebuild (a full scan of it) may take.
    crm_pipeline_compact_interval_s: float = 0.2
    crm_pipeline_compact_batch: int = 10_000
    crm_pipeline_compact_timeout_s: float = 10.0
    crm_pipeline_rebuild_timeout_s: float = 300.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def path(name: str) -> Path | None:
            return Path(env[name]) if env.get(name) else None

        return cls(
            database_url=env.get("DATABASE_URL") or None,
            supabase_url=env.get("SUPABASE_URL") or None,
            supabase_service_role_key=env.get("SUPABASE_SERVICE_ROLE_KEY") or None,
            data_dir=Path(env.get("DATA_DIR") or ".data"),
            crm_listen=env.get("CRM_LISTEN") or cls.crm_listen,
            provisioning_listen=env.get("PROVISIONING_LISTEN") or cls.provisioning_listen,
            crm_metrics_listen=env.get("CRM_METRICS_LISTEN") or None,
            provisioning_metrics_listen=env.get("PROVISIONING_METRICS_LISTEN") or None,
            auth_tokens_file=path("AUTH_TOKENS_FILE"),
            sendgrid_api_key=env.get("SENDGRID_API_KEY") or None,
            sendgrid_api_host=env.get("SENDGRID_API_HOST") or cls.sendgrid_api_host,
            tenant_config_root=Path(env.get("CLIENTS_DIR") or "clients"),
            crm_default_deadline_s=_seconds(env, "CRM_DEFAULT_DEADLINE_S", 10.0),
            provisioning_default_deadline_s=_seconds(env, "PROVISIONING_DEFAULT_DEADLINE_S", 60.0),
            slow_call_ms=int(env.get("SLOW_CALL_MS") or 3000),
            db_pool_min=int(env.get("DB_POOL_MIN") or 1),
            db_pool_max=int(env.get("DB_POOL_MAX") or 10),
            admission_max_in_flight=_optional_count(
                env, "ADMISSION_MAX_IN_FLIGHT", low=1, high=100_000
            ),
            admission_max_queued=_optional_count(
                env, "ADMISSION_MAX_QUEUED", low=0, high=1_000_000
            ),
            deprovision_max_in_flight=_count(
                env, "DEPROVISION_MAX_IN_FLIGHT", cls.deprovision_max_in_flight, low=1, high=1000
            ),
            dev_mode=_flag(env.get("DEV_MODE")),
            tls_cert_file=path("TLS_CERT_FILE"),
            tls_key_file=path("TLS_KEY_FILE"),
            tls_client_ca_file=path("TLS_CLIENT_CA_FILE"),
            allow_insecure=_flag(env.get("ALLOW_INSECURE")),
            crm_pipeline_compact_interval_s=_interval_or_off(
                env, "CRM_PIPELINE_COMPACT_INTERVAL_S", cls.crm_pipeline_compact_interval_s
            ),
            crm_pipeline_compact_batch=_count(
                env,
                "CRM_PIPELINE_COMPACT_BATCH",
                cls.crm_pipeline_compact_batch,
                low=1,
                high=1_000_000,
            ),
            crm_pipeline_compact_timeout_s=_seconds(
                env, "CRM_PIPELINE_COMPACT_TIMEOUT_S", cls.crm_pipeline_compact_timeout_s
            ),
            crm_pipeline_rebuild_timeout_s=_seconds(
                env, "CRM_PIPELINE_REBUILD_TIMEOUT_S", cls.crm_pipeline_rebuild_timeout_s
            ),
        )

    @property
    def admission(self) -> Admission:
        """The concurrency limits of a server, from these settings."""
        return Admission.for_pool(
            self.db_pool_max,
            max_in_flight=self.admission_max_in_flight,
            max_queued=self.admission_max_queued,
            deprovision_max_in_flight=self.deprovision_max_in_flight,
        )

    @property
    def server_tls(self) -> ServerTls | None:
        if self.tls_cert_file is None and self.tls_key_file is None:
            if self.tls_client_ca_file is not None:
                raise FailedPrecondition(
                    "TLS_CLIENT_CA_FILE needs TLS_CERT_FILE and TLS_KEY_FILE", reason="BAD_CONFIG"
                )
            return None
        if self.tls_cert_file is None or self.tls_key_file is None:
            raise FailedPrecondition(
                "set both TLS_CERT_FILE and TLS_KEY_FILE (or neither)", reason="BAD_CONFIG"
            )
        return ServerTls(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)

    @property
    def uses_supabase(self) -> bool:
        return bool(self.supabase_url and self.supabase_service_role_key)
