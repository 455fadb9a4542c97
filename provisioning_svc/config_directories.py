"""Tenant configuration directories: `CLIENTS_DIR/<tenant_id>`.

Removal must never reach outside CLIENTS_DIR. Everything is done relative to
a file descriptor of CLIENTS_DIR, on one validated path component, without
following symlinks:

- the tenant id is a slug (no `/`, no leading `.`), checked again here;
- `CLIENTS_DIR/<tenant_id>` must be a real directory (lstat, not stat): a
  symlink there is refused, whatever it points to;
- it is renamed aside atomically within CLIENTS_DIR (`.deleting-<tenant>-<job>`,
  a name no tenant id can take), checked again to be that same directory,
  then removed with `shutil.rmtree(dir_fd=...)`, which on Linux deletes
  through file descriptors and unlinks symlinks inside the tree instead of
  following them (`shutil.rmtree.avoids_symlink_attacks`).

CLIENTS_DIR itself is the operator's setting and may be reached through a
symlink of theirs; it must exist.
"""

from __future__ import annotations

import asyncio
import enum
import os
import shutil
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

from shared.deadline import Deadline
from shared.errors import DeadlineExceeded, FailedPrecondition
from shared.tenants import parse_tenant_id

# A directory of a few configuration files; more than this is not ours to wait for.
REMOVE_CAP_S = 10.0
ASIDE_PREFIX = ".deleting-"


class DirectoryState(enum.Enum):
    PRESENT = "present"
    ABSENT = "absent"


class ConfigDirectories:
    def __init__(self, root: Path) -> None:
        self.root = root

    async def inspect(self, tenant_id: str, deadline: Deadline) -> DirectoryState:
        """Whether the tenant has a directory; FailedPrecondition if it is unsafe to remove."""
        return await self._in_thread(self.inspect_now, deadline, tenant_id)

    async def remove(self, tenant_id: str, job_id: str, deadline: Deadline) -> DirectoryState:
        """Remove the tenant's directory; returns what there was before (PRESENT or ABSENT)."""
        return await self._in_thread(self.remove_now, deadline, tenant_id, job_id)

    async def _in_thread(
        self, function: Callable[..., DirectoryState], deadline: Deadline, *args: str
    ) -> DirectoryState:
        budget = deadline.budget(REMOVE_CAP_S, "config_directory")
        try:
            async with asyncio.timeout(budget):
                return await asyncio.to_thread(function, *args)
        except TimeoutError:
            raise DeadlineExceeded(
                "the configuration directory was not removed within the deadline",
                reason="DIRECTORY_TIMEOUT",
            ) from None

    def inspect_now(self, tenant_id: str) -> DirectoryState:
        name = _component(tenant_id)
        root = self._open_root()
        try:
            return DirectoryState.PRESENT if self._directory(root, name) else DirectoryState.ABSENT
        finally:
            os.close(root)

    def remove_now(self, tenant_id: str, job_id: str) -> DirectoryState:
        name = _component(tenant_id)
        aside = _component_aside(name, job_id)
        root = self._open_root()
        try:
            found = self._directory(root, name)
            if found is not None:
                # A leftover of an interrupted attempt would block the rename.
                self._remove_aside(root, aside, expected=None)
                os.rename(name, aside, src_dir_fd=root, dst_dir_fd=root)
            had_aside = self._remove_aside(root, aside, expected=found)
            return DirectoryState.PRESENT if found or had_aside else DirectoryState.ABSENT
        finally:
            os.close(root)

    def _open_root(self) -> int:
        if not shutil.rmtree.avoids_symlink_attacks:
            raise FailedPrecondition(
                "this platform's rmtree follows symlinks; refusing to remove directories",
                reason="UNSAFE_PLATFORM",
            )
        try:
            return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise FailedPrecondition(
                f"CLIENTS_DIR {self.root} is not a directory", reason="CLIENTS_DIR_MISSING"
            ) from None

    def _directory(self, root: int, name: str) -> os.stat_result | None:
        """lstat of a real directory `name` in root, None if absent; refuses anything else."""
        try:
            info = os.stat(name, dir_fd=root, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(info.st_mode):
            raise FailedPrecondition(
                f"CLIENTS_DIR/{name} is a symbolic link; refusing to remove it or its target",
                reason="CONFIG_DIRECTORY_SYMLINK",
            )
        if not stat.S_ISDIR(info.st_mode):
            raise FailedPrecondition(
                f"CLIENTS_DIR/{name} is not a directory; refusing to remove it",
                reason="CONFIG_DIRECTORY_NOT_A_DIRECTORY",
            )
        return info

    def _remove_aside(self, root: int, aside: str, expected: os.stat_result | None) -> bool:
        info = self._directory(root, aside)
        if info is None:
            return False
        if expected is not None and (info.st_dev, info.st_ino) != (
            expected.st_dev,
            expected.st_ino,
        ):
            # Something replaced the directory between the check and the rename.
            raise FailedPrecondition(
                f"CLIENTS_DIR/{aside} changed while being removed; left in place",
                reason="CONFIG_DIRECTORY_CHANGED",
            )
        shutil.rmtree(aside, dir_fd=root)
        return True


def _component(tenant_id: str) -> str:
    name = parse_tenant_id(tenant_id)
    # parse_tenant_id already forbids these; a path component is checked here too.
    if "/" in name or "\0" in name or name.startswith(".") or name != os.path.basename(name):
        raise FailedPrecondition("tenant id is not a single path component", reason="BAD_TENANT")
    return name


def _component_aside(name: str, job_id: str) -> str:
    return f"{ASIDE_PREFIX}{name}-{uuid.UUID(job_id)}"
