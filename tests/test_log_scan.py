"""The log scan (conftest `no_secrets_in_logs`) really finds a leaked token."""

from __future__ import annotations

from tests.conftest import TOKEN_READER, leaked


def test_scan_finds_a_token_in_a_line() -> None:
    lines = ["rpc method=/x code=OK", f"oops authorization=Bearer {TOKEN_READER}"]
    assert leaked(lines, [TOKEN_READER]) == [lines[1]]


def test_scan_passes_clean_lines() -> None:
    assert leaked(["rpc method=/x caller=reader code=OK"], [TOKEN_READER]) == []
