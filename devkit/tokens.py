"""AUTH_TOKENS_FILE for callers whose bearer tokens we hold (README, "Tokens file").

Only the sha256 of each token is written, as in production.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.auth import token_sha256


@dataclass(frozen=True)
class TokenCaller:
    name: str
    token: str
    scopes: Sequence[str]
    tenants: Sequence[str] | None = None  # None: every tenant


def _strings(values: Iterable[str]) -> str:
    # A JSON string is a valid TOML basic string.
    return "[" + ", ".join(json.dumps(value) for value in values) + "]"


def tokens_toml(callers: Iterable[TokenCaller], *, comment: str | None = None) -> str:
    lines = [f"# {comment}"] if comment else []
    for caller in callers:
        lines += [
            "[[callers]]",
            f"name = {json.dumps(caller.name)}",
            f'token_sha256 = "{token_sha256(caller.token)}"',
            f"scopes = {_strings(caller.scopes)}",
        ]
        if caller.tenants is not None:
            lines.append(f"tenants = {_strings(caller.tenants)}")
    return "\n".join(lines) + "\n"


def write_tokens_file(
    path: Path, callers: Iterable[TokenCaller], *, comment: str | None = None
) -> Path:
    """Write the file (readable by its owner only) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tokens_toml(callers, comment=comment))
    path.chmod(0o600)
    return path
