"""CLIENTS_DIR/<tenant_id> removal on a real filesystem: only a real directory
strictly inside CLIENTS_DIR goes, symlinks are never followed, a swap between
the check and the rename is caught, interrupted removals are finished."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from provisioning_svc.config_directories import ConfigDirectories, DirectoryState
from shared.deadline import Deadline
from shared.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from tests.provisioning_fixtures import make_config_directory, tree

JOB = str(uuid.UUID(int=7))


@pytest.fixture
def layout(tmp_path: Path) -> tuple[ConfigDirectories, Path, Path]:
    clients = tmp_path / "clients"
    outside = tmp_path / "outside"
    clients.mkdir()
    make_config_directory(outside)
    return ConfigDirectories(clients), clients, outside


def test_rmtree_is_the_symlink_safe_implementation() -> None:
    assert shutil.rmtree.avoids_symlink_attacks


def test_removes_a_real_directory(layout: Any) -> None:
    directories, clients, _ = layout
    make_config_directory(clients / "acme")
    make_config_directory(clients / "globex")
    assert directories.inspect_now("acme") is DirectoryState.PRESENT
    assert directories.remove_now("acme", JOB) is DirectoryState.PRESENT
    assert sorted(p.name for p in clients.iterdir()) == ["globex"]
    assert directories.remove_now("acme", JOB) is DirectoryState.ABSENT
    assert directories.inspect_now("acme") is DirectoryState.ABSENT


def test_symlinked_tenant_directory_is_refused(layout: Any) -> None:
    directories, clients, outside = layout
    (clients / "acme").symlink_to(outside, target_is_directory=True)
    before = tree(outside)
    for attempt in (directories.inspect_now, lambda t: directories.remove_now(t, JOB)):
        with pytest.raises(FailedPrecondition) as caught:
            attempt("acme")
        assert caught.value.reason == "CONFIG_DIRECTORY_SYMLINK"
    assert (clients / "acme").is_symlink()
    assert tree(outside) == before


def test_dangling_symlink_is_refused_too(layout: Any) -> None:
    directories, clients, _ = layout
    (clients / "acme").symlink_to(clients / "nowhere")
    with pytest.raises(FailedPrecondition):
        directories.remove_now("acme", JOB)
    assert (clients / "acme").is_symlink()


def test_symlinks_inside_the_tree_are_unlinked_not_followed(layout: Any) -> None:
    directories, clients, outside = layout
    make_config_directory(clients / "acme")
    (clients / "acme" / "linked-dir").symlink_to(outside, target_is_directory=True)
    (clients / "acme" / "templates" / "linked-file").symlink_to(outside / "branding.toml")
    (clients / "acme" / "templates" / "deep").mkdir()
    (clients / "acme" / "templates" / "deep" / "up").symlink_to("../../../..")
    before = tree(outside)
    assert directories.remove_now("acme", JOB) is DirectoryState.PRESENT
    assert list(clients.iterdir()) == []
    assert tree(outside) == before


def test_swap_to_a_symlink_between_check_and_rename_is_caught(
    layout: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    directories, clients, outside = layout
    make_config_directory(clients / "acme")
    before = tree(outside)
    real_rename = os.rename

    def swapping_rename(src: Any, dst: Any, **kwargs: Any) -> None:
        # An attacker replaces the checked directory with a symlink just in time.
        shutil.rmtree(clients / "acme")
        (clients / "acme").symlink_to(outside, target_is_directory=True)
        real_rename(src, dst, **kwargs)

    monkeypatch.setattr(os, "rename", swapping_rename)
    with pytest.raises(FailedPrecondition):
        directories.remove_now("acme", JOB)
    assert tree(outside) == before


def test_interrupted_removal_is_finished(layout: Any) -> None:
    directories, clients, _ = layout
    # A previous attempt renamed the directory aside and died before removing it.
    make_config_directory(clients / f".deleting-acme-{JOB}")
    assert directories.remove_now("acme", JOB) is DirectoryState.PRESENT
    assert list(clients.iterdir()) == []


def test_leftover_aside_and_a_new_directory_both_go(layout: Any) -> None:
    directories, clients, _ = layout
    make_config_directory(clients / f".deleting-acme-{JOB}")
    make_config_directory(clients / "acme")
    assert directories.remove_now("acme", JOB) is DirectoryState.PRESENT
    assert list(clients.iterdir()) == []


def test_symlink_in_place_of_the_aside_is_refused(layout: Any) -> None:
    directories, clients, outside = layout
    (clients / f".deleting-acme-{JOB}").symlink_to(outside, target_is_directory=True)
    before = tree(outside)
    with pytest.raises(FailedPrecondition):
        directories.remove_now("acme", JOB)
    assert tree(outside) == before


def test_missing_clients_dir_is_a_configuration_error(tmp_path: Path) -> None:
    directories = ConfigDirectories(tmp_path / "no-such-dir")
    with pytest.raises(FailedPrecondition) as caught:
        directories.inspect_now("acme")
    assert caught.value.reason == "CLIENTS_DIR_MISSING"


def test_clients_dir_reached_through_the_operators_symlink_works(tmp_path: Path) -> None:
    real = tmp_path / "real-clients"
    make_config_directory(real / "acme")
    (tmp_path / "clients").symlink_to(real, target_is_directory=True)
    directories = ConfigDirectories(tmp_path / "clients")
    assert directories.remove_now("acme", JOB) is DirectoryState.PRESENT
    assert list(real.iterdir()) == []


@pytest.mark.parametrize("hostile", ["..", "../outside", "a/b", ".", "", "x\x00", ".deleting-x"])
def test_hostile_ids_never_become_paths(layout: Any, hostile: str) -> None:
    directories, clients, _ = layout
    before = tree(clients.parent)
    with pytest.raises(InvalidArgument):
        directories.remove_now(hostile, JOB)
    assert tree(clients.parent) == before


async def test_async_removal_respects_the_deadline(layout: Any) -> None:
    directories, clients, _ = layout
    make_config_directory(clients / "acme")
    assert await directories.remove("acme", JOB, Deadline.after(5)) is DirectoryState.PRESENT
    make_config_directory(clients / "acme")
    with pytest.raises(DeadlineExceeded):
        await directories.remove("acme", JOB, Deadline.after(0.001))
    assert (clients / "acme").is_dir()
