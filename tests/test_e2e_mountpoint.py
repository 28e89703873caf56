"""Issue 10 item 8: the mount point cannot be swapped between its checks and mount(2).

Tests run as root; "another user" is uid 12345, acting through ``setpriv``. The race is
made deterministic with the simulator's ``stall_api`` fault: the daemon checked and pinned
the mount point and took its lock, then waits for its first vCenter call, which is held
until the attacker has replaced the mount point.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from guestfs_mount.control import socket_path
from guestfs_mount.sim.testing import run_simulator
from guestfs_mount.testing import mount_argv, mount_env, unmount
from tests import trees

pytestmark = [pytest.mark.fuse]

OTHER = 12345


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = str(tmp_path_factory.mktemp("guest"))
    trees.build(root)
    with run_simulator("--root", root) as s:
        yield s


@pytest.fixture
def base() -> Iterator[str]:
    """A directory the other user can reach (pytest's tmp_path is root's alone), holding a
    root-owned, non-empty ``victim`` directory."""
    d = tempfile.mkdtemp(prefix="gm-mountpoint-")
    os.chmod(d, 0o755)
    os.mkdir(os.path.join(d, "victim"))
    with open(os.path.join(d, "victim", "precious"), "w") as f:
        f.write("precious\n")
    try:
        yield d
    finally:
        for sub in ("victim", "home/mnt", "home/mnt.orig", "mnt", "target"):
            p = os.path.join(d, sub)
            while os.path.ismount(p):
                unmount(p, lazy=True)
        shutil.rmtree(d)


def _home_of_other(base: str) -> str:
    """``base/home`` owned by the other user, holding the mount point ``mnt`` (also theirs)."""
    home = os.path.join(base, "home")
    os.mkdir(home)
    os.mkdir(os.path.join(home, "mnt"))
    for p in (home, os.path.join(home, "mnt")):
        os.chown(p, OTHER, OTHER)
        os.chmod(p, 0o755)
    return os.path.join(home, "mnt")


def _as_other(script: str, *args: str) -> None:
    cmd = ["setpriv", f"--reuid={OTHER}", f"--regid={OTHER}", "--clear-groups", "--",
           "sh", "-ec", script, "sh", *args]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


def _start(sim: Any, mnt: str, *extra: str) -> Any:
    return subprocess.run(
        mount_argv(sim, mnt, *extra), env=mount_env(sim), capture_output=True, text=True, timeout=90
    )


def _mounted_anywhere(*paths: str) -> list[str]:
    return [p for p in paths if os.path.ismount(p)]


def _assert_refused(res: Any, *words: str) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("guestfs-mount: error: "), res.stderr
    for w in words:
        assert w in last, last


def test_symlink_mount_point_is_refused_unless_allowed(sim: Any, base: str) -> None:
    target = os.path.join(base, "target")
    os.mkdir(target)
    link = os.path.join(base, "mnt")
    os.symlink(target, link)
    _assert_refused(_start(sim, link), "is a symlink", "--allow-unsafe-mountpoint")
    assert not _mounted_anywhere(target)
    res = _start(sim, link, "--allow-unsafe-mountpoint")
    try:
        assert res.returncode == 0, res.stderr
        assert os.path.ismount(target)  # the symlink resolved once, at check time
        assert os.path.exists(os.path.join(target, "etc/hosts"))
    finally:
        unmount(target)


def test_parent_writable_by_another_user_is_refused(sim: Any, base: str) -> None:
    mnt = _home_of_other(base)
    res = _start(sim, mnt)
    _assert_refused(res, f"is owned by uid {OTHER}", "another user could replace it")
    assert not _mounted_anywhere(mnt)


def test_sticky_world_writable_parent_is_accepted_for_our_own_directory(
    sim: Any, base: str
) -> None:
    shared = os.path.join(base, "home")
    os.mkdir(shared)
    os.chmod(shared, 0o1777)  # like /tmp
    mnt = os.path.join(shared, "mnt")
    os.mkdir(mnt)
    res = _start(sim, mnt)
    try:
        assert res.returncode == 0, res.stderr
        assert os.path.ismount(mnt)
    finally:
        unmount(mnt)
    os.chmod(shared, 0o777)  # without the sticky bit anyone may rename it away
    _assert_refused(_start(sim, mnt), "is writable by others")


def _wait_for_lock(lock: str, proc: Any) -> None:
    """Until the daemon holds the mount point's lock: past its checks, before mount(2)."""
    while True:
        try:
            with open(lock) as f:
                if f.read().strip().isdigit():
                    return
        except FileNotFoundError:
            pass
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)


def test_mount_point_replaced_by_a_symlink_before_mount_is_refused(
    sim: Any, base: str, tmp_path: Any, monkeypatch: Any
) -> None:
    """The finding: the other user owns the parent and replaces ``mnt`` by a symlink to a
    non-empty directory while the daemon logs in; the mount used to land there."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    mnt = _home_of_other(base)
    victim = os.path.join(base, "victim")
    lock = socket_path(mnt)[: -len(".sock")] + ".lock"
    sim.faults(stall_api=True)
    try:
        proc = subprocess.Popen(
            mount_argv(sim, mnt, "--allow-unsafe-mountpoint"),
            env=mount_env(sim),
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_for_lock(lock, proc)
        _as_other('mv "$1" "$1.orig"; ln -s "$2" "$1"', mnt, victim)
        sim.faults(stall_api=False)
        code = proc.wait(timeout=90)
        assert proc.stderr is not None
        err = proc.stderr.read()
    finally:
        sim.reset_faults()
    assert not _mounted_anywhere(victim, mnt + ".orig"), err
    assert os.listdir(victim) == ["precious"]
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert f"mount point {mnt} was replaced since it was checked: it is now a symlink" in last
