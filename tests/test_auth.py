"""The tokens file: hashes only, scopes, tenant restrictions, bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.auth import Caller, TokenRegistry, token_sha256
from shared.errors import FailedPrecondition, PermissionDenied, Unauthenticated


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    return path


def test_authenticates_by_hash(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f'[[callers]]\nname = "bff"\ntoken_sha256 = "{token_sha256("s3cret")}"\n'
        'scopes = ["crm.pipeline.read"]\ntenants = ["acme"]\n',
    )
    assert "s3cret" not in path.read_text()
    caller = TokenRegistry.load(path).authenticate("s3cret")
    assert caller == Caller("bff", frozenset({"crm.pipeline.read"}), frozenset({"acme"}))
    caller.require_scope("crm.pipeline.read")
    caller.require_tenant("acme")
    with pytest.raises(PermissionDenied):
        caller.require_tenant("globex")
    with pytest.raises(PermissionDenied):
        caller.require_scope("provisioning.tenants.delete")


def test_unknown_token_is_unauthenticated_without_echoing_it(tmp_path: Path) -> None:
    registry = TokenRegistry.load(write(tmp_path, ""))
    with pytest.raises(Unauthenticated) as caught:
        registry.authenticate("guess-me")
    assert "guess-me" not in str(caught.value)


@pytest.mark.parametrize(
    "text",
    [
        "[[callers]\n",  # not TOML
        '[[callers]]\nname = "x"\ntoken_sha256 = "abc"\n',  # not a sha256
        '[[callers]]\ntoken_sha256 = "' + "a" * 64 + '"\n',  # no name
    ],
)
def test_bad_files_are_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(FailedPrecondition):
        TokenRegistry.load(write(tmp_path, text))
