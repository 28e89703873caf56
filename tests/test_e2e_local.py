"""Local attack surface (issue 10): what another local user, or a careless value, can do
to the mount from this host. Each test runs the real command line against the simulator."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from guestfs_mount.control import socket_path
from guestfs_mount.sim.testing import run_simulator
from guestfs_mount.testing import mount_argv, mount_env, mounted, unmount
from tests import trees

pytestmark = pytest.mark.fuse

NOBODY = 65534


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = str(tmp_path_factory.mktemp("guest"))
    trees.build(root)
    with run_simulator("--root", root) as s:
        yield s


def _start(sim: Any, mnt: str, *extra: str, env: dict[str, str] | None = None) -> Any:
    """Daemon mode (the default): returns when mounted or refused."""
    os.makedirs(mnt, exist_ok=True)
    return subprocess.run(
        mount_argv(sim, mnt, *extra),
        env=env or mount_env(sim),
        capture_output=True,
        text=True,
        timeout=90,
    )


def _assert_refused(res: Any, mnt: str, *words: str) -> None:
    """Exit 2, no traceback, the last line of stderr says why, nothing mounted."""
    mounted_now = os.path.ismount(mnt)
    if mounted_now:
        unmount(mnt)
    assert not mounted_now, res.stderr
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("guestfs-mount: error: "), res.stderr
    for w in words:
        assert w.lower() in last.lower(), last


def _daemon_pid(mnt: str) -> int:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"guestfs_mount.cli" in argv and os.fsencode(mnt) in argv:
                return int(pid)
    raise AssertionError(f"no daemon for {mnt}")


# -- item 7: no password in the daemon's environment --------------------------------------


def _environ(pid: int) -> bytes:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read()


def _assert_no_secret_env(env: bytes, sim: Any) -> None:
    names = {e.split(b"=", 1)[0] for e in env.split(b"\0") if e}
    assert b"GUESTFS_PASSWORD" not in names and b"GUESTFS_GUEST_PASSWORD" not in names
    assert sim.password.encode() not in env and sim.guest_password.encode() not in env
    assert b"GUESTFS_USER" in names  # the rest of the environment is kept


def test_foreground_daemon_environment_has_no_password(sim: Any, tmp_path: Any) -> None:
    with mounted(sim, str(tmp_path / "m")) as m:
        assert os.path.exists(m.path("etc/hosts"))
        _assert_no_secret_env(_environ(m.pid), sim)


def test_forked_daemon_environment_has_no_password(sim: Any, tmp_path: Any) -> None:
    mnt = str(tmp_path / "m")
    res = _start(sim, mnt)
    assert res.returncode == 0, res.stderr
    try:
        _assert_no_secret_env(_environ(_daemon_pid(mnt)), sim)
    finally:
        unmount(mnt)


# -- item 13: every option value is checked before anything starts --------------------------

BAD_VALUES = [
    ("--uid", "-5"),
    ("--uid", "99999999999"),
    ("--gid", "4294967295"),
    ("--gid", "wheel"),
    ("--timeout", "nan"),
    ("--timeout", "inf"),
    ("--timeout", "0"),
    ("--timeout", "-1"),
    ("--metadata-ttl", "nan"),
    ("--metadata-ttl", "-1"),
    ("--metadata-ttl", "1e999"),
    ("--cache-size", "0"),
    ("--cache-size", "5x"),
    ("--guest-root", ""),
    ("--esx-host", ""),
    ("-o", "timeout=inf"),
    ("-o", "uid=-1"),
]


@pytest.mark.parametrize(("option", "value"), BAD_VALUES, ids=[f"{o}={v}" for o, v in BAD_VALUES])
def test_bad_option_value_is_refused_at_start(
    sim: Any, tmp_path: Any, option: str, value: str
) -> None:
    mnt = str(tmp_path / "m")
    if option == "-o":
        args, name = [option, value], value.split("=")[0]
    else:
        args, name = [f"{option}={value}"], option.lstrip("-")
    _assert_refused(_start(sim, mnt, *args), mnt, name)


@pytest.mark.parametrize("where", ["missing-dir", "a-directory"])
def test_unusable_log_file_is_one_line(sim: Any, tmp_path: Any, where: str) -> None:
    path = str(tmp_path / "nowhere" / "x.log") if where == "missing-dir" else str(tmp_path)
    mnt = str(tmp_path / "m")
    _assert_refused(_start(sim, mnt, "--log-file", path), mnt, "log file")


# -- item 10: the log file is never a link, never someone else's, created 0600 --------------


def test_log_file_created_private_and_used(sim: Any, tmp_path: Any) -> None:
    log = tmp_path / "mount.log"
    mnt = str(tmp_path / "m")
    with mounted(sim, mnt, "--log-file", str(log)) as m:
        assert os.path.exists(m.path("etc/hosts"))
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600
    assert "mounted" in log.read_text()


def _victim(tmp_path: Any) -> str:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.chmod(victim, 0o644)
    return str(victim)


@pytest.mark.parametrize("kind", ["symlink", "other-owner", "group-writable", "hard-link"])
def test_log_file_planted_by_another_user_is_refused(sim: Any, tmp_path: Any, kind: str) -> None:
    victim = _victim(tmp_path)
    log = str(tmp_path / "mount.log")
    if kind == "symlink":
        os.symlink(victim, log)
    elif kind == "hard-link":
        os.link(victim, log)
    else:
        with open(log, "w") as f:
            f.write("x\n")
        if kind == "other-owner":
            os.chown(log, NOBODY, NOBODY)
            os.chmod(log, 0o600)
        else:
            os.chmod(log, 0o660)
    mnt = str(tmp_path / "m")
    _assert_refused(_start(sim, mnt, "--log-file", log), mnt, "log file", "refused")
    with open(victim) as f:
        assert f.read() == "precious\n"


# -- item 12: one mount per mount point ----------------------------------------------------


def test_two_mounts_at_once_on_one_mountpoint_do_not_stack(sim: Any, tmp_path: Any) -> None:
    """Both pass the 'already a mount point' check; the lock lets only one mount. The
    race is made deterministic: the first daemon holds the lock while its vCenter login
    is stalled (the simulator's stall_api), and the second starts only then."""
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    lock = socket_path(mnt)[: -len(".sock")] + ".lock"
    sim.faults(stall_api=True)
    try:
        first = subprocess.Popen(
            mount_argv(sim, mnt), env=mount_env(sim), stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 60
        while not _lock_held(lock):
            assert first.poll() is None and time.monotonic() < deadline, first.returncode
            time.sleep(0.02)
        second = subprocess.run(
            mount_argv(sim, mnt), env=mount_env(sim), stderr=subprocess.PIPE, text=True,
            timeout=90,
        )  # fmt: skip
    finally:
        sim.reset_faults()
    try:
        assert first.wait(timeout=90) == 0
        with open("/proc/self/mountinfo") as f:
            stacked = sum(1 for line in f if f" {mnt} " in line)
        assert stacked == 1
        assert second.returncode == 1, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "already mounted by pid" in lines[0], second.stderr
        assert os.listdir(mnt)
    finally:
        while os.path.ismount(mnt):
            unmount(mnt)


def _lock_held(lock: str) -> bool:
    """The daemon writes its pid into the mount point's lock once it holds it."""
    try:
        with open(lock) as f:
            return f.read().strip().isdigit()
    except FileNotFoundError:
        return False
