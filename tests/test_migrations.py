"""`make migrate` (python -m shared.database.migrations) refuses the pooler."""

from __future__ import annotations

import os
import subprocess
import sys


def test_migrate_refuses_supabases_transaction_pooler() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shared.database.migrations"],
        # Nothing listens there: a refusal must come before any connection attempt.
        env={**os.environ, "DATABASE_URL": "postgresql://u:secret-pw@127.0.0.1:6543/postgres"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "port 6543, Supabase's transaction pooler" in result.stderr
    assert "secret-pw" not in result.stderr + result.stdout
