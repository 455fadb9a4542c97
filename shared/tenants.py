"""Tenant ids: the one validation both services apply before touching anything."""

from __future__ import annotations

import re

from shared.errors import InvalidArgument

# Slugs, as tenant ids are everywhere; fullmatch, so a trailing newline does not slip
# through as `$` would allow.
TENANT_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def parse_tenant_id(value: str, field: str = "tenant_id") -> str:
    if not TENANT_ID.fullmatch(value):
        raise InvalidArgument(
            f"{field} must match ^[a-z0-9][a-z0-9_-]{{0,62}}$ (lowercase slug, 1-63 characters)",
            field=field,
            reason="INVALID_TENANT_ID",
        )
    return value
