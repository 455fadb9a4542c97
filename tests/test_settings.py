"""Settings from the environment: defaults, parsing and refusals (shared/settings.py)."""

from __future__ import annotations

import pytest

from shared.errors import FailedPrecondition
from shared.settings import Settings


def test_compaction_settings_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.crm_pipeline_compact_interval_s == 0.2
    assert settings.crm_pipeline_compact_batch == 10_000
    assert settings.crm_pipeline_compact_timeout_s == 10.0


def test_compaction_settings_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "CRM_PIPELINE_COMPACT_INTERVAL_S": "0",
            "CRM_PIPELINE_COMPACT_BATCH": " 500 ",
            "CRM_PIPELINE_COMPACT_TIMEOUT_S": "2.5",
        }
    )
    assert settings.crm_pipeline_compact_interval_s == 0.0
    assert settings.crm_pipeline_compact_batch == 500
    assert settings.crm_pipeline_compact_timeout_s == 2.5


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CRM_PIPELINE_COMPACT_INTERVAL_S", "fast", "must be a number of seconds"),
        ("CRM_PIPELINE_COMPACT_INTERVAL_S", "-1", "must be 0 (off) or in [0.01, 3600]"),
        ("CRM_PIPELINE_COMPACT_INTERVAL_S", "0.001", "must be 0 (off) or in [0.01, 3600]"),
        ("CRM_PIPELINE_COMPACT_INTERVAL_S", "nan", "must be 0 (off) or in [0.01, 3600]"),
        ("CRM_PIPELINE_COMPACT_INTERVAL_S", "inf", "must be 0 (off) or in [0.01, 3600]"),
        ("CRM_PIPELINE_COMPACT_INTERVAL_S", "7200", "must be 0 (off) or in [0.01, 3600]"),
        ("CRM_PIPELINE_COMPACT_BATCH", "lots", "must be a whole number"),
        ("CRM_PIPELINE_COMPACT_BATCH", "2.5", "must be a whole number"),
        ("CRM_PIPELINE_COMPACT_BATCH", "0", "must be in [1, 1000000]"),
        ("CRM_PIPELINE_COMPACT_BATCH", "1000001", "must be in [1, 1000000]"),
        ("CRM_PIPELINE_COMPACT_TIMEOUT_S", "0", "must be in (0, 3600]"),
        ("CRM_PIPELINE_COMPACT_TIMEOUT_S", "soon", "must be a number of seconds"),
    ],
)
def test_compaction_settings_refuse_garbage(name: str, value: str, message: str) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        Settings.from_env({name: value})
    assert caught.value.reason == "BAD_CONFIG"
    assert name in caught.value.message and message in caught.value.message


def test_admission_bounds_derive_from_the_pool_unless_set() -> None:
    derived = Settings.from_env({"DB_POOL_MAX": "6"}).admission
    assert (derived.general.limit, derived.general.max_queue) == (12, 300)
    (deprovision,) = derived.own.values()
    assert (deprovision.name, deprovision.limit) == ("deprovision", 2)

    configured = Settings.from_env(
        {
            "ADMISSION_MAX_IN_FLIGHT": "8",
            "ADMISSION_MAX_QUEUED": "0",
            "DEPROVISION_MAX_IN_FLIGHT": "1",
        }
    ).admission
    assert (configured.general.limit, configured.general.max_queue) == (8, 0)
    assert [limit.limit for limit in configured.own.values()] == [1]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ADMISSION_MAX_IN_FLIGHT", "0", "must be in [1, 100000]"),
        ("ADMISSION_MAX_IN_FLIGHT", "many", "must be a whole number"),
        ("ADMISSION_MAX_QUEUED", "-1", "must be in [0, 1000000]"),
        ("DEPROVISION_MAX_IN_FLIGHT", "0", "must be in [1, 1000]"),
    ],
)
def test_admission_settings_refuse_garbage(name: str, value: str, message: str) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        Settings.from_env({name: value})
    assert name in caught.value.message and message in caught.value.message
